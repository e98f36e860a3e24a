import hashlib, os, shutil, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAKE = (ROOT/'../shared/data/petpark-lake').resolve()
TEST_LAKE = ROOT/'tests/lake'


def tree_digest(root: Path) -> dict:
    "Path -> (sha256, mode) for every file under `root`, to prove a folder was not touched"
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(root.rglob('*')) if p.is_file()}


def make_lake(dst: Path, per_class: int, start: int = 0, dirty: bool = True) -> Path:
    "A lake of `per_class` real photos per class from the park's lake (from index `start`), plus the test lake's dirt"
    for label in ['Cat', 'Dog']:
        (dst/label).mkdir(parents=True, exist_ok=True)
        real = sorted(p for p in (LAKE/label).glob('*.jpg') if p.stem.isdigit())
        for p in real[start:start + per_class]: shutil.copy(p, dst/label/p.name)
    if dirty: shutil.copytree(TEST_LAKE, dst, dirs_exist_ok=True)
    for p in dst.rglob('*'): p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def venv_env(**extra)->dict:
    "Environment for subprocesses: this venv's tools first, plus `extra` variables"
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra)


@pytest.fixture
def env(): return venv_env()



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
