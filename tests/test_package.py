"Explain and package a tiny real model: ONNX parity, int8, model card with the real figures, registry round trip, refusals"
import json, shutil
import numpy as np, pandas as pd, pytest
from petpark.core import PetparkError, load_params
from petpark.ingest import ingest_stage
from petpark.evaluate import evaluate_folder
from petpark.package import package_stage
from petpark.registry import Registry
from petpark.monitor import load_reference
from petpark.runtime import onnx_session, onnx_predict, Contract, load_dir, load_inputs
from petpark.testing import lesson_model, tiny_params
from conftest import TEST_LAKE, make_lake, petpark

SMALL = dict(package__parity_images=24, package__calib_images=16, package__serve='int8', package__max_int8_drop=0.5)


@pytest.fixture(scope='module')
def pk(tmp_path_factory):
    "A tiny model, a small ingested lake, evaluate's verdict under lenient limits, and the package stage run on them"
    d = tmp_path_factory.mktemp('pk')
    mp = pytest.MonkeyPatch(); mp.setenv('PETPARK_REGISTRY_DIR', str(d/'registry'))
    lesson_model(d)
    lake = make_lake(d/'lake', 20)
    P = tiny_params(lenient=True, **SMALL)
    ingest_stage(P, lake, d/'ingest', d/'metrics/ingest.json', cache_dir=d/'cache')
    ev = evaluate_folder(TEST_LAKE, P, d/'models', d/'valid_preds.csv', d/'eval')
    assert ev['gate']['passed']
    res = package_stage(P, d/'ingest/manifest.csv', lake, d/'models', d/'eval/metrics.json', d/'no_explain.json',
                        d/'package', d/'metrics/package.json', d/'reports', valid_preds=d/'valid_preds.csv')
    assert json.loads((d/'metrics/package.json').read_text()) == res and (d/'reports/06_package_card.html').exists()
    yield d, lake, ev, res
    mp.undo()


def test_onnx_matches_pytorch_and_int8_is_measured(pk):
    d, lake, ev, res = pk
    assert res['parity']['passed'] and res['parity']['max_abs_prob_diff'] <= 1e-4 and res['parity']['label_agreement'] == 1
    drop = res['accuracy']['fp32'] - res['accuracy']['int8']
    assert res['int8_drop'] == pytest.approx(drop, abs=1e-6)
    assert res['served'] == ('fp32' if drop > SMALL['package__max_int8_drop'] else 'int8'), 'the served variant follows params and the drop'
    man = pd.read_csv(d/'ingest/manifest.csv'); paths = [lake/p for p in man[man.status == 'test'].path]
    p32, e32 = onnx_predict(onnx_session(d/'package/model.onnx'), paths, 64, bs=5)   # dynamic batch: 5s and a remainder
    p8, _ = onnx_predict(onnx_session(d/'package/model.int8.onnx'), paths, 64)
    assert p32.shape == (len(paths), 2) and e32.shape == (len(paths), 512) and np.allclose(p32.sum(1), 1, atol=1e-5)
    assert np.allclose(p8.sum(1), 1, atol=1e-4), 'softmax stays float in the int8 model'
    assert (p32.argmax(1) == p8.argmax(1)).mean() >= 0.6, 'int8 keeps most of the (tiny) model\'s answers'


def test_the_mirror_runs_only_where_the_model_is_unsure(pk):
    "serving.json carries the margin chosen on validation, and the served model mirrors exactly the photos that close to the threshold"
    d, lake, ev, res = pk
    sv, m = json.loads((d/'package/serving.json').read_text()), res['mirror']
    assert sv['mirror_margin'] == m['margin'] in {0, *load_params().package.mirror_margins}
    assert 'model.onnx' in sv['files'].values() and 0 <= m['test_mirrored'] <= 1 and m['validation_accuracy'] >= m['validation_never']
    model = load_dir(d/'package', 'fp32')
    paths = [TEST_LAKE/f'{c}/{i}.jpg' for c in ['Cat', 'Dog'] for i in range(1, 7)]  # the test lake's clean photos
    x = load_inputs(paths, model.size)
    plain, flip = model.graph(x)[0], model.graph(np.ascontiguousarray(x[:, :, ::-1]))[0]
    for margin in [0, 0.1, 0.3, 1]:
        model.mirror_margin = margin
        near = np.abs(plain[:, 1] - sv['threshold']) < margin
        assert np.allclose(model.run(x)[0], np.where(near[:, None], (plain + flip)/2, plain), atol=1e-6)


def test_package_needs_the_validation_predictions(pk, tmp_path):
    d, lake, ev, res = pk
    with pytest.raises(PetparkError, match='no validation predictions.*dvc repro train'):
        package_stage(tiny_params(lenient=True, **SMALL), d/'ingest/manifest.csv', lake, d/'models', d/'eval/metrics.json', d/'no_explain.json',
                      tmp_path/'package', tmp_path/'package.json', tmp_path/'reports', valid_preds=tmp_path/'none.csv')


def test_packaged_model_scores_a_folder_with_the_learners_numbers(pk, tmp_path):
    "`evaluate --images` runs the packaged fp32 model on ONNX Runtime: same probabilities (to parity), labels and figures as the learner"
    d, lake, ev, res = pk
    sv = json.loads((d/'package/serving.json').read_text())
    shutil.copytree(d/'package', tmp_path/'always')  # the learner averages every photo with its mirror image: so does this copy
    (tmp_path/'always/serving.json').write_text(json.dumps({**sv, 'mirror_margin': 1}))
    fast = evaluate_folder(TEST_LAKE, tiny_params(lenient=True, **SMALL), tmp_path/'always', out_dir=tmp_path/'fast')
    assert fast['threshold'] == sv['threshold'] == ev['threshold'] and "packaged model's rule" in fast['threshold_choice']['why']
    assert (fast['n'], fast['accuracy'], fast['confusion']) == (ev['n'], ev['accuracy'], ev['confusion'])
    a, b = pd.read_csv(d/'eval/preds.csv'), pd.read_csv(tmp_path/'fast/preds.csv')
    assert list(a.columns) == list(b.columns) and (a.path == b.path).all() and (a.pred == b.pred).all()
    assert np.abs(a.p_Dog - b.p_Dog).max() <= 1e-4
    with pytest.raises(PetparkError, match='choose one of'): evaluate_folder(TEST_LAKE, model_dir=d/'package', variant='fp16')


def test_model_card_carries_the_real_figures(pk):
    d, lake, ev, res = pk
    card = (d/'package/model_card.md').read_text()
    assert card.startswith('---') and 'model-index' in card and 'library_name: onnx' in card
    assert f"Accuracy **{ev['accuracy']:.2%}**" in card
    for c, v in ev['per_class'].items(): assert f"| {c} | {v['precision']:.2%} | {v['recall']:.2%} |" in card
    assert ev['bias']['statement'] in card and f"{res['parity']['max_abs_prob_diff']:.2e}" in card
    for k in ['Intended use', 'Out-of-scope uses', 'Training data', 'Limitations', 'Ethical considerations', 'Lineage']:
        assert f'## {k}' in card
    assert res['files']['model.onnx'] in card, 'lineage names the file hashes'


def test_packaged_model_is_registered_and_verified(pk):
    d, lake, ev, res = pk
    reg = Registry(d/'registry', 'petpark-classifier')
    v = reg.resolve(res['registered']['version'])
    assert v['hash'] == res['files']['model.onnx'] and v['gate']['passed']
    got = reg.fetch(v['hash'][:10], d/'fetched')
    assert set(got['files']) == {'model.onnx', 'model.int8.onnx', 'serving.json', 'model_card.md', 'reference.npz'}
    serving = json.loads((d/'fetched/serving.json').read_text())
    assert serving['classes'] == ['Cat', 'Dog'] and serving['threshold'] == ev['threshold'] and serving['served'] in ('int8', 'fp32')
    ref = load_reference(d/'fetched/reference.npz')  # and so does the monitors' reference
    assert ref['embedding'].shape == (res['reference_photos'], 512) and ref['confusion'].shape == (2, 2) and len(ref['p_pos']) == res['reference_photos']
    c = Contract.of(serving)  # the input contract travels with the version: a server needs no params.yaml
    assert (c.formats, c.min_side, c.max_pixels) == (['JPEG', 'PNG', 'WEBP', 'BMP'], 32, 40_000_000)


def test_failed_gate_is_refused(pk, tmp_path):
    d, lake, ev, res = pk
    strict = evaluate_folder(TEST_LAKE, load_params(), d/'models', d/'valid_preds.csv', tmp_path/'eval')
    assert not strict['gate']['passed']
    with pytest.raises(PetparkError, match='failed its evaluate gate'):
        package_stage(tiny_params(**SMALL), d/'ingest/manifest.csv', lake, d/'models', tmp_path/'eval/metrics.json',
                      tmp_path/'none.json', tmp_path/'package', tmp_path/'metrics.json', tmp_path/'reports')
    assert not (tmp_path/'package/model.onnx').exists(), 'nothing is exported for a refused model'


def test_registry_cli_round_trip(tmp_path, env):
    env['PETPARK_REGISTRY_DIR'] = str(tmp_path/'reg'); env['PETPARK_USER'] = 'qa-anna'
    reg = Registry(tmp_path/'reg', 'petpark-classifier')
    for i, passed in enumerate([True, True, False]):
        (tmp_path/f'm{i}.onnx').write_bytes(f'model {i}'.encode())
        reg.register([tmp_path/f'm{i}.onnx'], dict(gate=dict(passed=passed, reasons=[] if passed else ['accuracy 0.9 < 0.99'])))
    ok = lambda *a: petpark(*a, env=env)
    assert ok('registry', 'promote', 'v1', 'staging').returncode == 0
    r = ok('registry', 'promote', 'v1', 'prod')
    assert r.returncode == 2 and 'no QA approval' in r.stderr and 'Traceback' not in r.stderr
    r = ok('registry', 'approve', 'v1', '--note', 'looks fine')
    assert r.returncode == 2 and 'no pre-production test' in r.stderr, 'approval needs a pre-production verdict'
    reg.record_preprod('v1', False, ['load'], 'reports/preprod_v1.html', by='qa-anna')
    r = ok('registry', 'approve', 'v1', '--note', 'looks fine')
    assert r.returncode == 2 and "latest pre-production test failed (load" in r.stderr
    reg.record_preprod('v1', True, report='reports/preprod_v1.html', by='qa-anna')
    assert ok('registry', 'approve', 'v1').returncode == 2, 'an approval needs a note'
    assert ok('registry', 'approve', 'v1', '--note', 'smoke and accuracy ok').returncode == 0
    assert ok('registry', 'promote', 'v1', 'prod').returncode == 0
    reg.record_preprod('v2', True, report='reports/preprod_v2.html', by='qa-anna')
    for a in [('promote', 'v2', 'staging'), ('approve', 'v2', '--note', 'ok'), ('promote', 'v2', 'prod')]:
        assert ok('registry', *a).returncode == 0, a
    r = ok('registry', 'promote', 'v3', 'staging')
    assert r.returncode == 2 and 'failed its evaluate gate' in r.stderr
    assert 'prod is back on v1' in ok('registry', 'rollback', 'prod', '--note', 'v2 misreads night photos').stdout
    assert 'v1: m0.onnx ok' in ok('registry', 'fetch', 'prod', '--dest', str(tmp_path/'out')).stdout
    assert (tmp_path/'out/m0.onnx').read_bytes() == b'model 0'
    listing = ok('registry', 'list').stdout
    assert 'v1' in listing and 'prod' in listing and 'staging' in listing
    audit = reg.audit_log()
    acts = [(a['action'], a.get('version') or a.get('to_version')) for a in audit]
    assert ('approve', 'v1') in acts and ('rollback', 'v1') in acts and ('promote-refused', 'v3') in acts
    assert all(a['user'] == 'qa-anna' for a in audit if a['action'] != 'register')
    (reg.dir/'v1/m0.onnx').write_bytes(b'tampered')
    r = ok('registry', 'fetch', 'prod')
    assert r.returncode == 2 and 'missing or altered' in r.stderr


def test_explain_one_photo_from_the_command_line(pk, env, tmp_path):
    d = pk[0]
    r = petpark('explain', TEST_LAKE/'Dog/1.jpg', '--model-dir', d/'models', '--max-evals', 60, '--out', tmp_path/'dog.png', env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] in ('Cat', 'Dog') and (tmp_path/'dog.png').stat().st_size > 1000
    r = petpark('explain', str(TEST_LAKE/'Cat/notes.jpg'), '--model-dir', str(d/'models'), env=env)
    assert r.returncode == 2 and 'not a readable image' in r.stderr and 'Traceback' not in r.stderr
