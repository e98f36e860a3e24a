"Training as torchrun ranks (gloo on this CPU): the same step as one process on the whole batch, and the stage's outputs written once"
import json, subprocess, sys
import pandas as pd, pytest, torch
from petpark.core import PetparkError
from petpark.ingest import ingest_stage
from petpark.train import train_stage, run_ranks
from petpark.testing import tiny_params, read_wandb_run, find_wandb_runs
from conftest import ROOT, TEST_LAKE, venv_env
from ddp_step import step_weights


def torchrun(n:int, *args)->subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', *map(str, args)],
                          cwd=ROOT, env=venv_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)


def test_two_ranks_take_the_same_step_as_one_process_with_the_whole_batch(tmp_path):
    r = torchrun(2, ROOT/'tests/ddp_step.py', tmp_path/'w2.pt')
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = step_weights()
    w2 = torch.load(tmp_path/'w2.pt')
    assert w1.shape == w2.shape
    diff, step = (w1 - w2).abs().max().item(), (w1 - w0).abs().max().item()
    print(f'{len(w1):,} weights: largest step {step:.2e}, largest difference between the two runs {diff:.2e}')
    assert step > 1e-4, 'the step moved the weights'
    # fastai's Adam moves a weight by lr * g / (|g| + eps) on its first step: where the mean gradient g is a near-cancelling
    # sum, the float rounding of a different summation order shows at lr * dg / eps (measured: 3.7e-06 against a 1.0e-03 step)
    assert diff < 0.01 * step, f'2 ranks x 8 photos and 1 process x 16 photos took different steps: max weight difference {diff:.2e}'


def test_a_tiny_run_on_two_ranks_writes_its_outputs_once(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_DIR', str(tmp_path)); monkeypatch.setenv('PETPARK_WANDB_MODE', 'offline')
    monkeypatch.setenv('PETPARK_TRAIN_PROCS', '2')
    P = tiny_params()
    ingest_stage(P, TEST_LAKE, tmp_path/'ingest', tmp_path/'metrics/ingest.json', cache_dir=tmp_path/'cache')
    res = train_stage(P, tmp_path/'ingest/manifest.csv', TEST_LAKE, tmp_path/'models', tmp_path/'train', tmp_path/'metrics/train.json')
    assert json.loads((tmp_path/'metrics/train.json').read_text()) == res and res['procs'] == 2
    assert {f.name for f in (tmp_path/'models').iterdir()} == {'model.pkl', 'model.pth', 'model.json'}
    assert pd.read_csv(tmp_path/'train/history.csv').phase.tolist() == ['frozen', 'unfrozen']
    assert len(pd.read_csv(tmp_path/'train/valid_preds.csv')) == res['n_valid']
    runs = [read_wandb_run(r) for r in find_wandb_runs(tmp_path)]
    assert sorted(r['name'] for r in runs) == ['final', 'search-0'], 'one W&B run per fit, from rank 0 only'
    final = [r for r in runs if r['name'] == 'final'][0]
    assert final['id'] == res['wandb_run'] and final['config']['procs'] == 2 and final['config']['bs'] == P.train.bs


def test_a_bad_number_of_processes_is_one_clear_error(tmp_path, monkeypatch):
    paths = dict(manifest=tmp_path/'m.csv', data_dir=TEST_LAKE, model_dir=tmp_path, out_dir=tmp_path, metrics=tmp_path/'t.json')
    with pytest.raises(PetparkError, match='train.bs = 8 does not split over train_procs = 3'): run_ranks(3, tiny_params(), **paths)
    monkeypatch.setenv('PETPARK_TRAIN_PROCS', '0')
    with pytest.raises(PetparkError, match='train_procs .or PETPARK_TRAIN_PROCS. is 0: use 1'): train_stage(tiny_params(), **paths)


def test_bench_scale_measures_ingest_training_and_serving_at_one_and_two_workers(tmp_path, monkeypatch):
    "`petpark bench scale`'s run at tiny size: the test lake, the tiny params (one rank through torchrun too), a lesson package"
    from petpark.bench import bench_scale
    from petpark.testing import lesson_package
    pk = lesson_package(tmp_path, 'pkg', True, int8=True)[0].parent
    bodies = [(TEST_LAKE/f'{c}/{i}.jpg').read_bytes() for c in ('Cat', 'Dog') for i in (1, 2)]
    res = bench_scale(TEST_LAKE, pk, bodies, tiny_params(), tmp_path/'bench_scale', train_photos=16, requests=24, concurrency=4, today_rps=5)
    t = res['table']
    assert list(zip(t.workload, t.workers)) == [(w, n) for w in ('ingest', 'train', 'serve') for n in (1, 2)]
    assert (t.throughput > 0).all() and t.speedup[t.workers == 1].eq(1).all() and t.serial_fraction[t.workers == 1].isna().all()
    tr = t.work[t.workload == 'train']
    assert tr.nunique() == 1 and tr.iloc[0] > 0  # the same photos x epochs on 1 rank and on 2
    p = res['projection']
    assert p.workload.tolist() == ['ingest', 'train', 'serve'] and p.needed.tolist()[-1] == 500 and (p.machines_like_this >= 1).all()
    md = (tmp_path/'bench_scale.md').read_text()
    assert 'serial fraction' in md and 'a model, not a measurement' in md and json.loads((tmp_path/'bench_scale.json').read_text())['table']
