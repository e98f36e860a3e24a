"The real thing at small size: `petpark data` + `dvc repro` in a temporary copy of the repo on a subset of the lake"
import json, re, shutil, sqlite3
import httpx, pandas as pd, yaml
from petpark.proc import Served
from conftest import LAKE, petpark, sh, tree_digest

def test_dvc_repro_end_to_end(tiny_pipeline, tmp_path):
    tp = tiny_pipeline  # `petpark data`, `dvc repro` (TINY params: the gate fails), `dvc repro` (LENIENT), committed
    repo, lake, env, before = tp.repo, tp.lake, dict(tp.env), tp.lake_digest
    assert 'data/ holds the lake' in tp.data and (repo/'data/Cat').is_dir()
    assert tp.strict.returncode != 0 and 'failed its evaluate gate' in tp.strict.out, 'package refuses the failed model'
    assert not tp.strict.onnx
    for f in ['reports/01_ingest.ipynb', 'reports/02_eda.ipynb', 'reports/02_eda.html',
              'artifacts/ingest/manifest.csv', 'artifacts/ingest/splits.csv', 'reports/03_train.ipynb', 'models/model.pkl',
              'artifacts/train/history.csv', 'reports/04_evaluate.html', 'artifacts/evaluate/roc.csv']:
        assert (repo/f).stat().st_size > 0, f
    man = pd.read_csv(repo/'artifacts/ingest/manifest.csv')
    assert sorted(man.path) == sorted(before), 'the manifest must account for every lake file once'
    metrics = json.loads((repo/'metrics/ingest.json').read_text())
    assert metrics['files'] == len(before) and metrics['reason']['truncated'] == 1
    html = (repo/'reports/02_eda.html').read_text()
    assert 'photos per class and split' in html and 'from petpark' not in html and "<pre>{'" not in html, 'EDA page: figures, no code, no raw dict'
    assert 'Label review' in html and 'still to review' in html
    eda = json.loads((repo/'metrics/eda.json').read_text())
    assert eda['review']['queued'] == len(pd.read_csv(repo/'artifacts/eda/review_queue.csv')) == eda['review']['suspects']
    ev = tp.strict.evaluate
    assert ev['gate']['passed'] is False and ev['n'] == len(man[man.status == 'test']), 'a tiny model fails the gate'
    assert 'Confusion' in sh('dvc plots show --json', repo, env)
    assert tp.strict.explain, 'explain needs no gate: it is how a failed model is understood'

    # with limits it can meet, the same model is explained, packaged and registered
    out = tp.lenient
    assert 'Passed unknown parameter' not in out, 'each notebook is handed only the params file and its paths'
    pk = json.loads((repo/'metrics/package.json').read_text())
    assert pk['parity']['passed'] and pk['registered']['version'] == 'v1'
    for f in ['artifacts/package/model.onnx', 'artifacts/package/model.int8.onnx', 'reports/06_package_card.html',
              'reports/05_explain.html', 'metrics/explain.json']:
        assert (repo/f).stat().st_size > 0, f
    assert f"{pk['accuracy']['fp32']:.2%}" in (repo/'reports/06_package_card.md').read_text()
    # one decision rule: the metrics, each photo's label in preds.csv, the model card and what the server loads
    ev, preds = json.loads((repo/'metrics/evaluate.json').read_text()), pd.read_csv(repo/'artifacts/evaluate/preds.csv')
    assert round(float((preds.pred == preds.label).mean()), 6) == ev['accuracy']
    assert json.loads((repo/'artifacts/package/serving.json').read_text())['threshold'] == ev['threshold']
    assert ev['threshold_choice']['why'] in (repo/'reports/06_package_card.md').read_text()
    assert 'v1' in sh('petpark registry list', repo, env)
    mon = json.loads((repo/'metrics/monitor.json').read_text())
    assert mon['window']['photos'] == 0 and mon['checks'][0]['verdict'] == 'n/a', 'nothing served yet: the monitor stage says so'
    assert (repo/'reports/07_monitor.html').stat().st_size > 0
    again = sh('dvc repro', repo, env)
    assert re.findall(r"Running stage '(\w+)'", again) == ['monitor'], 'only the monitor, whose log grows by itself, runs again'
    assert tree_digest(lake) == before, 'the lake must stay byte-for-byte unchanged'

    # an experiment with one knob changed is compared with the baseline by `dvc exp show`
    # it runs in DVC's temporary copy of the repo (as `--queue` does), and this site's state survives it: its W&B
    # final run and its registered version land in the workspace it was started from, once each
    sh("git add -A && git commit -qm 'monitor again' --allow-empty", repo, env)
    runs = lambda: set((repo/'wandb').glob('offline-run-*'))
    before = runs()
    sh('dvc exp run --temp -n lr-001 -S train.search.lrs=[] -S train.lr=0.001', repo, env)
    table = sh('dvc exp show --csv', repo, env)
    assert 'lr-001' in table and 'accuracy' in table
    sh('petpark experiments', repo, env)  # the recipes table: this clone's experiments, and the rows the project's table had
    assert {'lr-001', 'ls-180px-2ep'} <= set(pd.read_csv(repo/'reports/experiments.csv').experiment)
    assert len(runs() - before) == 1, 'the experiment final fit is recorded here once'
    reg = json.loads((repo/'registry/petpark-classifier/registry.json').read_text())
    assert list(reg['versions']) == ['v1', 'v2'], 'the experiment model is registered here, once'
    assert not list((repo/'.dvc/tmp/exps').rglob('registry.json')), 'nothing is left in the temporary copy'

    # a changed lake is taken in only when asked: `petpark data` says so, and then the stages that use it are stale
    data_v1 = yaml.safe_load((repo/'data.dvc').read_text())['outs'][0]['md5']  # the snapshot v1 was trained on
    shutil.copy(lake/'Cat/1.jpg', lake/'Cat/1_copy.jpg')
    assert 'ingest' not in sh('dvc status', repo, env), 'the pinned snapshot does not move by itself'
    assert 'changed: commit data.dvc' in sh('petpark data', repo, env)
    assert 'ingest' in sh('dvc status', repo, env)

    # a reviewer decides two photos of the test split (the queue lists suspects); the next repro (retrain's, below) applies them
    assert 'photos to review' in sh('petpark review', repo, env)
    t = man[man.status == 'test']
    cat, dog = t[t.label == 'Cat'].path.iloc[0], t[t.label == 'Dog'].path.iloc[0]
    sh(f'petpark review {cat} --relabel Dog --why "a dog behind the cat"', repo, env)
    sh(f'petpark review {dog} --drop --why "a charity logo, no animal"', repo, env)
    r = petpark('review', 'Cat/none.jpg', '--keep', '--why', 'x', cwd=repo, env=env)
    assert r.returncode == 2 and 'not a photo of the lake snapshot' in r.stderr + r.stdout
    sh("git add -A && git commit -qm 'new lake photo, two reviews'", repo, env)

    # production's loop: a served prediction walks back to its commit and data; staff labels retrain to staging
    # (v1 serves: it was trained at the first commit, on the snapshot before the new photo; one repro fewer than v3 of its own)
    first = sh('git rev-list --max-parents=0 HEAD', repo, env).strip()
    sh('petpark registry promote v1 staging', repo, env)
    env.update(PETPARK_STAFF_TOKEN='staff', PETPARK_DB_URL=f'sqlite:///{tmp_path}/log.sqlite', PETPARK_USER='po-paula',
               PETPARK_REGISTRY_DIR=str(repo/'registry'))  # the server runs from this checkout, not the copy's
    shots = [(p, c) for c in ['Cat', 'Dog'] for p in sorted((LAKE/c).glob('*.jpg'))[500:505]]  # never in this lake
    with Served(['petpark', 'serve', '--stage', 'staging', '--port', '{port}'], env) as s:
        for p, c in shots:
            rid = httpx.post(s.url + '/predict', files=[('files', (p.name, p.read_bytes(), 'image/jpeg'))]).json()['request_id']
            assert httpx.post(s.url + '/feedback', json=dict(request_id=rid, label=c), headers={'X-Staff-Token': 'staff'}).status_code == 200
    lin = json.loads(sh(f'petpark lineage {rid} --as-json', repo, env))
    assert lin['model']['version'] == 'v1' and lin['model']['matches_registry']
    assert lin['code']['commit'] == first and lin['code']['code_differed'] is False, 'the commit it was trained at, with clean code'
    assert lin['data']['data_dvc_md5'] == data_v1 and not lin['data']['current'] and lin['params']['train']['img_size'] == 64
    words = sh(f'petpark lineage {rid}', repo, env)
    assert f'commit {first[:12]}' in words and 'data.dvc has moved on' in words

    wrong = sqlite3.connect(tmp_path/'log.sqlite').execute('SELECT COUNT(*) FROM predictions WHERE feedback != label').fetchone()[0]
    r = petpark('retrain', cwd=repo, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'v3 is in staging' in r.stdout and 'next:' in r.stdout
    # v3 is trained on the reviewed labels: the relabelled photo keeps its split, the dropped one is out, and both are reported
    m3 = pd.read_csv(repo/'artifacts/ingest/manifest.csv').set_index('path')
    assert m3.loc[cat, ['label', 'lake_label', 'split']].tolist() == ['Dog', 'Cat', 'test'] and m3.loc[dog, 'reason'] == 'review_drop'
    ev = json.loads((repo/'metrics/evaluate.json').read_text())
    assert (ev['as_labelled']['n'], ev['as_labelled']['relabelled'], ev['as_labelled']['dropped']) == (ev['n'] + 1, 1, 1)
    assert '1 relabelled and 1 dropped by review' in (repo/'reports/06_package_card.md').read_text()
    batch = sorted(lake.glob('*/feedback-*/*.jpg'))
    assert len(batch) == len(shots) - wrong, 'labels that contradict the model are held, not trained on'
    held = sh('petpark retrain --held', repo, env).strip().splitlines()
    assert len(held) - 1 == wrong if wrong else held == ['no labels are held for review']
    assert yaml.safe_load((repo/'data.dvc').read_text())['outs'][0]['md5'] != data_v1, 'the new lake version is pinned'
    man = pd.read_csv(repo/'artifacts/ingest/manifest.csv')
    assert set(b.relative_to(lake).as_posix() for b in batch) <= set(man.path)
    state = json.loads((repo/'registry/petpark-classifier/registry.json').read_text())
    assert state['stages']['staging'][-1] == 'v3' and 'v3' not in state['stages']['prod'] and state['preprod']['v3']
    p = petpark('registry', 'promote', 'v3', 'prod', cwd=repo, env=env)
    assert p.returncode == 2 and 'no QA approval' in p.stderr, 'never straight to prod'
    acts = [a['action'] for a in map(json.loads, (repo/'registry/petpark-classifier/audit.jsonl').read_text().splitlines()) if a['user'] == 'po-paula']
    assert [a for a in acts if a.startswith('retrain')] == ['retrain-start', 'retrain-batch', 'retrain-data', 'retrain-repro', 'retrain-done']
    assert 'promote' in acts and 'preprod-test' in acts
