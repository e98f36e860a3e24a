"""One optimiser step of the real learner on a fixed batch of 16 test-lake photos, in this process or in each torchrun rank.
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_step.py OUT` writes rank 0's weights after the step to OUT."""
import sys
import pandas as pd, torch
from fastai.vision.all import Callback, DataLoader, DataLoaders, TrainEvalCallback, set_seed, rank_distrib, num_distrib
from petpark.core import proj_path
from petpark.testing import TEST_LAKE
from petpark.train import get_dls, get_learner, distributed

N = 16  # photos in the step: one batch of 16 in one process, 16 / world in each rank


class EvalMode(Callback):
    """The whole model in eval mode while it trains. In training mode the head's BatchNorm normalises each rank's share of
    the batch by that share's statistics (no SyncBatchNorm on CPU), and dropout draws a mask per rank: both valid, but
    not the one-process step. In eval mode each photo's loss depends on that photo alone, so the mean of the ranks'
    gradients is the gradient of the whole batch, and the steps must agree up to float rounding."""
    order = TrainEvalCallback.order + 1
    def before_train(self): self.model.eval()


def _weights(m)->torch.Tensor: return torch.cat([p.detach().flatten() for p in m.parameters()])

def step_weights()->tuple:
    "Every weight of the real learner (EfficientNet-Lite0, ImageNet, unfrozen) before and after one step on the fixed batch"
    lake = proj_path(TEST_LAKE)
    items = pd.DataFrame(dict(path=[f'{l}/{i}.jpg' for l in ['Cat', 'Dog'] for i in range(1, N // 2 + 1)],
                              label=[l for l in ['Cat', 'Dog'] for _ in range(N // 2)], is_valid=False))
    dls = get_dls(items, lake, 64, N, 42)
    x, y = dls.test_dl(items, with_labels=True, bs=N).one_batch()  # resized and normalised, no random augmentation
    world, ds = max(1, num_distrib()), list(zip(x, y))
    fixed = DataLoaders(DataLoader(ds, bs=N // world, shuffle=False), DataLoader(ds, bs=N // world), device='cpu')
    set_seed(42, reproducible=True)
    learn = get_learner(dls, 'efficientnet_lite0', wd=0.01, cbs=[EvalMode()])
    learn.dls = fixed; learn.unfreeze()
    before = _weights(learn.model).clone()
    with distributed(learn): learn.fit(1, 1e-3)
    return before, _weights(learn.model)


if __name__ == '__main__':
    w = step_weights()[1]
    if rank_distrib() == 0: torch.save(w, sys.argv[1])
    if num_distrib(): torch.distributed.destroy_process_group()
