"A tiny training run through real fastai: model files, W&B offline records read back, evaluate report and gate"
import json
import numpy as np, pandas as pd, pytest
from petpark.core import PetparkError, load_params
from petpark.ingest import ingest_stage
from petpark.train import train_stage
from petpark.evaluate import evaluate_folder
from petpark.judge import check_gate, judge
from petpark.testing import tiny_params, read_wandb_run, find_wandb_runs
from conftest import TEST_LAKE, make_lake, petpark

# params.yaml's recipe with a budget of seconds (params.yaml's backbone, a tiny image size, two search trials)
RECIPE = dict(train__backbone=load_params().train.backbone, train__bs=16, train__search__lrs=[0.001, 0.003],
            train__search__subset=20, train__search__budget_s=120.0)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "Ingest a small lake and train a tiny model on it, with W&B writing offline under the temp folder"
    d = tmp_path_factory.mktemp('tiny')
    mp = pytest.MonkeyPatch(); mp.setenv('WANDB_DIR', str(d)); mp.setenv('PETPARK_WANDB_MODE', 'offline')
    lake = make_lake(d/'lake', 40)
    P = tiny_params(**RECIPE)
    ingest_stage(P, lake, d/'ingest', d/'metrics/ingest.json', cache_dir=d/'cache')
    res = train_stage(P, d/'ingest/manifest.csv', lake, d/'models', d/'train', d/'metrics/train.json')
    assert json.loads((d/'metrics/train.json').read_text()) == res, 'the stage writes the metrics it returns'
    yield d, res
    mp.undo()


def test_tiny_training_writes_model_curves_and_trials(tiny):
    d, res = tiny
    assert {f.name for f in (d/'models').iterdir()} == {'model.pkl', 'model.pth', 'model.json'}
    meta = json.loads((d/'models/model.json').read_text())
    assert meta['img_size'] == 64 and meta['classes'] == ['Cat', 'Dog'] and meta['mean'] == [0.5]*3
    trials = pd.read_csv(d/'train/search.csv')
    assert len(trials) == 2 and res['lr'] == trials.lr[0], 'the final fit uses the best trial on validation'
    hist = pd.read_csv(d/'train/history.csv')
    assert hist.phase.tolist() == ['frozen', 'unfrozen'] and hist.valid_loss.notna().all()
    vp = pd.read_csv(d/'train/valid_preds.csv')
    assert len(vp) == res['n_valid'] and np.allclose(vp.p_Cat + vp.p_Dog, 1, atol=1e-4)
    man = pd.read_csv(d/'ingest/manifest.csv')
    assert not set(vp.path) & set(man[man.status == 'test'].path), 'validation comes from the train split only'


def test_wandb_offline_records_read_back(tiny):
    d, res = tiny
    runs = {r['name']: r for r in map(read_wandb_run, find_wandb_runs(d))}
    assert {'search-0', 'search-1', 'final'} <= set(runs)
    final = runs['final']
    assert final['id'] == res['wandb_run']
    assert final['config']['lr'] == res['lr'] and final['config']['img_size'] == 64
    assert final['config']['git_commit'] and final['config']['data_dvc_md5']
    assert [h for h in final['history'] if 'valid_loss' in h], 'per-epoch metrics are logged'
    assert {'name': 'petpark-model', 'type': 'model', 'files': ['model.json', 'model.pkl', 'model.pth']} in \
        [dict(a, files=sorted(a['files'])) for a in final['artifacts']]


def test_bad_model_fails_the_gate_and_is_refused(tiny, tmp_path):
    d, _ = tiny
    res = evaluate_folder(TEST_LAKE, load_params(), d/'models', d/'train/valid_preds.csv', tmp_path/'eval')
    assert res['n'] > 20 and not res['gate']['passed'] and any('accuracy' in r for r in res['gate']['reasons'])
    assert {'roc.csv', 'pr.csv', 'calibration.csv', 'confusion.csv', 'preds.csv', 'metrics.json'} <= \
        {f.name for f in (tmp_path/'eval').iterdir()}
    with pytest.raises(PetparkError, match='failed its evaluate gate'):
        check_gate(tmp_path/'eval/metrics.json')


def test_a_model_that_always_says_dog_is_called_biased():
    preds = pd.DataFrame(dict(label=['Cat']*50 + ['Dog']*50, p_Dog=0.9, p_Cat=0.1))
    res, _ = judge(preds, None, ['Cat', 'Dog'], load_params().evaluate)
    assert not res['gate']['passed']
    assert res['bias']['statement'].startswith('predicts dog 100.0% more often than it should')
    assert any('recall gap' in r for r in res['gate']['reasons'])


def test_cli_evaluate_a_folder(tiny, env, tmp_path):
    d, _ = tiny
    r = petpark('evaluate', '--images', TEST_LAKE, '--model-dir', d/'models', '--out-dir', tmp_path/'rep', env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'FAIL' in r.stdout and 'bias: the model predicts' in r.stdout and (tmp_path/'rep/metrics.json').exists()
    r = petpark('evaluate', '--images', tmp_path/'none', env=env)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and '--images' in r.stderr
