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

