import hashlib, json, os, shutil, sys
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


@pytest.fixture
def env():
    "Environment for subprocesses: this venv's tools first"
    e = dict(os.environ)
    e['PATH'] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    return e


def package_version(d:Path, name:str, tta:bool, int8:bool=False):
    "A tiny real model exported to ONNX (and int8 if asked) with its serving description, as the package stage lays it out"
    from petpark.train import lesson_model
    from petpark.package import load_torch_model, served_model, export_onnx, quantize_int8
    if not (d/'models/model.pth').exists(): lesson_model(d)
    m, meta = load_torch_model(d/'models')
    out = d/name; out.mkdir()
    export_onnx(served_model(m, meta['mean'], meta['std'], tta), out/'model.onnx', meta['img_size'])
    files = {'fp32': 'model.onnx'}
    if int8:
        quantize_int8(out/'model.onnx', out/'model.int8.onnx', [TEST_LAKE/f'{c}/{i}.jpg' for c in ['Cat', 'Dog'] for i in range(1, 5)], meta['img_size'])
        files['int8'] = 'model.int8.onnx'
    (out/'serving.json').write_text(json.dumps(dict(classes=meta['classes'], positive='Dog', threshold=0.5, img_size=meta['img_size'],
                                                    served='fp32', files=files, gate={'passed': True, 'reasons': []})))
    return [out/f for f in files.values()] + [out/'serving.json']
