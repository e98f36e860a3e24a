import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
from types import SimpleNamespace
import pytest, yaml
from petpark.testing import TEST_LAKE, TINY, LENIENT  # defined once, for lessons and tests alike
from petpark.pipeline import copy_project, lake_sample, set_params

ROOT = Path(__file__).resolve().parents[1]
LAKE = (ROOT/'../shared/data/petpark-lake').resolve()


def tree_digest(root: Path) -> dict:
    "Path -> (sha256, mode) for every file under `root`, to prove a folder was not touched"
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(root.rglob('*')) if p.is_file()}


def make_lake(dst: Path, per_class: int, start: int = 0, dirty: bool = True) -> Path:
    "A lake of `per_class` real photos per class from the park's lake (from index `start`), plus the test lake's dirt"
    lake_sample(dst, per_class, start, lake=LAKE)
    if dirty: shutil.copytree(TEST_LAKE, dst, dirs_exist_ok=True)
    for p in dst.rglob('*'): p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def venv_env(**extra)->dict:
    "Environment for subprocesses: this venv's tools first, plus `extra` variables"
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra)


@pytest.fixture
def env(): return venv_env()


@pytest.fixture(scope='session', autouse=True)
def wandb_offline(tmp_path_factory):
    "W&B offline for every test, its records in the session's temporary folder (a test that reads them sets its own WANDB_DIR)"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('WANDB_MODE', 'offline'); mp.setenv('WANDB_DIR', str(tmp_path_factory.mktemp('wandb')))
        yield


def petpark(*args, env, cwd=ROOT, timeout=None) -> subprocess.CompletedProcess:
    "The `petpark` command run as a user runs it, in `cwd` with `env`; its exit code and output (`timeout`: seconds, then TimeoutExpired)"
    return subprocess.run(['petpark', *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sh(cmd, cwd, env):
    r = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f'{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r.stdout + r.stderr


def copy_repo(dst: Path) -> Path:
    "The checkout's tracked and new files (no venv, data, caches or outputs), as a fresh clone would have them"
    return copy_project(dst, ROOT)


def dvc_outs(repo: Path) -> list:
    "Every output that `data.dvc` and `dvc.lock` record, cached by DVC or kept in git"
    lock = yaml.safe_load((repo/'dvc.lock').read_text())['stages']
    return [o['path'] for o in yaml.safe_load((repo/'data.dvc').read_text())['outs']] + [o['path'] for st in lock.values() for o in st.get('outs', [])]


def file_hashes(repo: Path, paths: list) -> dict:
    "sha256 of every file at or under each of `paths` (relative to `repo`)"
    files = [f for p in paths for f in ([repo/p] if (repo/p).is_file() else sorted((repo/p).rglob('*')))]
    return {f.relative_to(repo).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.fixture(scope='session')
def tiny_pipeline(tmp_path_factory):
    """This checkout run end to end at tiny size, once a session, for the tests that need a pipeline state: a copy of the
    repo, a lake of 30 photos a class (plus the test lake's dirt), `petpark data`, then `dvc repro` with TINY params and the
    real gate (the tiny model fails it, so packaging stops: `strict`), then with LENIENT limits (on through packaging),
    committed. Tests that change it (test_pipeline does) come after the ones that only read it or clone its `commit`."""
    tmp = tmp_path_factory.mktemp('tiny_pipeline')
    repo, lake = copy_repo(tmp/'repo'), make_lake(tmp/'lake', 30)
    lake_digest = tree_digest(lake)
    env = venv_env(); env.pop('WANDB_DIR', None)
    env.update(PETPARK_LAKE=str(lake), PYTHONPATH=str(repo), PETPARK_CACHE_DIR=str(tmp/'cache'), WANDB_MODE='offline',
               GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@t', GIT_COMMITTER_NAME='t', GIT_COMMITTER_EMAIL='t@t')
    set_params(repo/'params.yaml', {**TINY, 'retrain.hold_confidence': 0.5})  # a tiny model is never sure: every label that contradicts it is held
    (repo/'artifacts/ingest/reviews.csv').write_text('sha256,path,decision,label,by,date,why\n')  # this lake's review has not begun
    sh('git init -q && git add -A && git commit -qm base', repo, env)
    data = sh('petpark data', repo, env)
    r = subprocess.run('dvc repro', shell=True, cwd=repo, env=env, capture_output=True, text=True)
    strict = SimpleNamespace(returncode=r.returncode, out=r.stdout + r.stderr, onnx=(repo/'artifacts/package/model.onnx').exists(),
                             explain=(repo/'reports/05_explain.html').exists(),
                             evaluate=json.loads((repo/'metrics/evaluate.json').read_text()))
    set_params(repo/'params.yaml', LENIENT)
    lenient = sh('dvc repro', repo, env)
    sh("git add -A && git commit -qm 'tiny run'", repo, env)
    return SimpleNamespace(repo=repo, lake=lake, env=env, lake_digest=lake_digest, data=data, strict=strict, lenient=lenient,
                           commit=sh('git rev-parse HEAD', repo, env).strip(), outs=file_hashes(repo, dvc_outs(repo)))


PG_BIN = Path(os.environ.get('PETPARK_PG_BIN', '/usr/lib/postgresql/15/bin'))


def _as_postgres(args:list)->list:
    "`initdb` and the server refuse root: as root, run them as the `postgres` user"
    return ['runuser', '-u', 'postgres', '--', *map(str, args)] if os.geteuid() == 0 else list(map(str, args))


@pytest.fixture(scope='session')
def pg_server():
    "A real PostgreSQL server on a free loopback port, in a temporary folder, stopped after the session; its base URL"
    import socket, subprocess, tempfile
    if not (PG_BIN/'initdb').exists(): pytest.skip(f'PostgreSQL binaries absent ({PG_BIN}): apt-get install postgresql (or set PETPARK_PG_BIN)')
    d = Path(tempfile.mkdtemp(prefix='petpark-pg-'))
    if os.geteuid() == 0: shutil.chown(d, 'postgres', 'postgres')
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    run = lambda *a: subprocess.run(_as_postgres(a), check=True, capture_output=True, text=True)
    run(PG_BIN/'initdb', '-D', d/'data', '-U', 'postgres', '-A', 'trust', '-E', 'UTF8', '--no-sync')
    run(PG_BIN/'pg_ctl', '-D', d/'data', '-l', d/'server.log', '-w', '-o', f'-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off', 'start')
    try: yield f'postgresql://postgres@127.0.0.1:{port}'
    finally:
        subprocess.run(_as_postgres([PG_BIN/'pg_ctl', '-D', d/'data', '-m', 'fast', '-w', 'stop']), capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server, request):
    "A fresh, empty database on the session's PostgreSQL server, for one test; its URL"
    import psycopg, re
    name = 't_' + re.sub(r'\W', '_', request.node.name.lower())[:50]
    with psycopg.connect(f'{pg_server}/postgres', autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS {name}'); c.execute(f'CREATE DATABASE {name}')
    return f'{pg_server}/{name}'
