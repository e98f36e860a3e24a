"""A DVC remote: `petpark remote push` from the clone that ran the pipeline, `petpark remote pull` into a fresh clone
elsewhere (no lake there), the same files, and nothing to re-run; on a folder remote and on an S3-compatible server
(moto's) on loopback. The pipeline state is the session's tiny run (conftest's `tiny_pipeline`): nothing is trained here."""
import json, logging, re, subprocess
from pathlib import Path
import boto3, pytest, yaml
from moto.server import ThreadedMotoServer
from petpark.proc import free_port
from conftest import dvc_outs, file_hashes, petpark, sh


def clone(tp, dst: Path, env: dict, cache: Path = None) -> Path:
    "A git clone of the tiny pipeline's committed state; `cache`: use that DVC cache (the clone that ran the pipeline)"
    dst.parent.mkdir(parents=True, exist_ok=True)
    sh(f'git clone -q {tp.repo} {dst} && git -C {dst} checkout -q {tp.commit}', dst.parent, env)
    if cache: sh(f'dvc cache dir --local {cache}', dst, env)
    return dst


def round_trip(tp, tmp: Path, **remote) -> Path:
    "Push from a clone with the pipeline's cache, pull into a fresh clone without the lake; check files and status"
    env = dict(tp.env, **remote)
    a = clone(tp, tmp/'site-a/repo', env, cache=tp.repo/'.dvc/cache')
    assert 'pushed' in sh('petpark remote push', a, dict(env, PYTHONPATH=str(a)))
    # another machine: the lake that data.dvc was imported from is not there (nor is PETPARK_LAKE's)
    b = clone(tp, tmp/'site-b/repo', env)
    env_b = dict(env, PYTHONPATH=str(b), PETPARK_LAKE=str(tmp/'no-lake'))
    assert not (b/yaml.safe_load((b/'data.dvc').read_text())['deps'][0]['path']).exists()
    assert not (b/'models/model.pkl').exists() and not (b/'data').exists()
    sh('petpark remote pull', b, env_b)
    got = file_hashes(b, dvc_outs(b))
    assert got == tp.outs, 'the lake snapshot, models, reports and metrics are byte for byte those the pipeline wrote'
    assert {'data/Cat', 'models/model.pkl', 'artifacts/package/model.onnx', 'reports/04_evaluate.html',
            'metrics/evaluate.json'} <= {k.rsplit('/', 1)[0] if k.startswith('data/') else k for k in got}
    st = subprocess.run('dvc status --json', shell=True, cwd=b, env=env_b, capture_output=True, text=True)
    assert json.loads(st.stdout) == {'monitor': ['always changed']}, 'up to date but for the always-run monitor stage'
    dry = sh('dvc repro --dry', b, env_b)
    assert re.findall(r"Running stage '(\w+)'", dry) == ['monitor'], 'nothing to retrain'
    assert sh('git status --porcelain', b, env_b).strip() == '', 'the remote lives in .dvc/config.local, out of git'
    assert 'petpark' in (b/'.dvc/config.local').read_text() and 'petpark' not in (b/'.dvc/config').read_text()
    return b


def test_folder_remote_round_trip(tiny_pipeline, tmp_path):
    tp, store = tiny_pipeline, tmp_path/'dvc-store'
    empty = clone(tp, tmp_path/'empty/repo', tp.env)
    r = petpark('remote', 'pull', cwd=empty, env=dict(tp.env, PYTHONPATH=str(empty), PETPARK_DVC_REMOTE=str(store)))
    assert r.returncode == 2 and 'Traceback' not in r.stderr and str(store) in r.stderr, 'an empty remote: a clear error'
    r = petpark('remote', 'push', cwd=empty, env=dict(tp.env, PYTHONPATH=str(empty), PETPARK_DVC_REMOTE=''))
    assert r.returncode == 2 and 'PETPARK_DVC_REMOTE' in r.stderr and 'Traceback' not in r.stderr
    round_trip(tp, tmp_path, PETPARK_DVC_REMOTE=str(store))
    assert len(list((store/'files/md5').rglob('*.dir'))) == 2, 'the two folders: the lake snapshot and the monitor window'


@pytest.fixture
def s3():
    "moto's S3-compatible server on a free loopback port, with a bucket; stopped after the test"
    port = free_port()
    logging.getLogger('werkzeug').setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
    server.start()
    keys = dict(AWS_ACCESS_KEY_ID='park-key', AWS_SECRET_ACCESS_KEY='park-secret', AWS_DEFAULT_REGION='us-east-1')
    url = f'http://127.0.0.1:{port}'
    client = boto3.client('s3', endpoint_url=url, region_name=keys['AWS_DEFAULT_REGION'],
                          aws_access_key_id=keys['AWS_ACCESS_KEY_ID'], aws_secret_access_key=keys['AWS_SECRET_ACCESS_KEY'])
    client.create_bucket(Bucket='petpark')
    try: yield url, keys, client
    finally: server.stop()


def test_s3_remote_round_trip(tiny_pipeline, tmp_path, s3):
    url, keys, client = s3
    round_trip(tiny_pipeline, tmp_path, PETPARK_DVC_REMOTE='s3://petpark/dvc', PETPARK_DVC_REMOTE_ENDPOINT=url, **keys)
    stored = [o['Key'] for o in client.list_objects_v2(Bucket='petpark', Prefix='dvc/')['Contents']]
    assert any(k.endswith('.dir') for k in stored) and all(k.startswith('dvc/files/md5/') for k in stored)
