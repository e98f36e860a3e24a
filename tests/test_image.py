"""The serving image, built offline by `make image` (a debootstrap base, wheels built here, no registry), run as a container
on a free loopback port with a registered model mounted read-only at /model: photos, hostile input, /ready, the health check,
no PyTorch inside, not root"""
import json, os, shutil, subprocess, time
import httpx, pytest
from petpark.proc import free_port
from petpark.testing import lesson_registry
from conftest import ROOT, TEST_LAKE

IMAGE, BASE = 'petpark-serve', 'petpark-base:bookworm'


def docker(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run(['docker', *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert not check or r.returncode == 0, f"docker {' '.join(map(str, args))}: {r.stderr or r.stdout}"
    return r


def can_run_docker() -> bool:
    "Docker is usable here, or `make image` can install and start it (root, or sudo without a password)"
    if shutil.which('docker') and subprocess.run(['docker', 'info'], capture_output=True).returncode == 0: return True
    return os.geteuid() == 0 or bool(shutil.which('sudo')) and subprocess.run(['sudo', '-n', 'true'], capture_output=True).returncode == 0


@pytest.fixture(scope='module')
def image():
    "`make image` (the base once, then cached layers): the image's id; its failure is a test failure, not a skip"
    if not can_run_docker(): pytest.skip('docker cannot run here: not root, no password-less sudo, and no usable docker daemon')
    t0 = time.time()
    r = subprocess.run(['make', 'image'], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"make image failed:\n{(r.stdout + r.stderr)[-4000:]}"
    print(f"make image: {time.time() - t0:.0f} s")
    return docker('image', 'inspect', '-f', '{{.Id}}', IMAGE).stdout.strip()


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    "The verified files of a registered lesson model, as `petpark registry fetch` gives them, readable by any user"
    d = tmp_path_factory.mktemp('image')
    out = d/'model'
    lesson_registry(d).fetch('v1', out)
    out.chmod(0o755)
    for p in out.iterdir(): p.chmod(0o644)
    return out


class Container:
    "The image run detached with the host's network, listening on 127.0.0.1:`port`, the model mounted read-only"
    def __init__(self, model_dir, port):
        self.name, self.url = f'petpark-test-{os.getpid()}-{port}', f'http://127.0.0.1:{port}'
        docker('run', '-d', '--name', self.name, '--network', 'host', '-v', f'{model_dir}:/model:ro',
               '-e', f'PETPARK_SERVE_PORT={port}', '-e', 'PETPARK_SERVE_MAX_BYTES=300000',
               '--health-interval', '1s', '--health-start-period', '60s', IMAGE)  # the image's own check, polled faster

    def logs(self) -> str:
        r = docker('logs', '--tail', '60', self.name, check=False)
        return r.stdout + r.stderr

    def wait_ready(self, timeout=90):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if httpx.get(self.url + '/ready', timeout=2).status_code == 200: return
            except httpx.HTTPError: pass
            state = json.loads(docker('inspect', '-f', '{{json .State}}', self.name).stdout)
            assert state['Running'], f"the container stopped (exit {state['ExitCode']}):\n{self.logs()}"
            time.sleep(0.5)
        raise AssertionError(f"not ready in {timeout} s:\n{self.logs()}")

    def health(self) -> str: return docker('inspect', '-f', '{{.State.Health.Status}}', self.name).stdout.strip()

    def stop(self): docker('rm', '-f', '-v', self.name, check=False)  # -v: its anonymous /data volume too


@pytest.fixture(scope='module')
def ctr(image, model_dir):
    c = Container(model_dir, free_port())
    try:
        c.wait_ready()
        yield c
    finally: c.stop()


def predict(url, *paths):
    return httpx.post(url + '/predict', files=[('files', (p.name, p.read_bytes(), 'image/jpeg')) for p in paths], timeout=30)


def test_the_image_is_built_on_the_debootstrap_base_and_its_size_is_recorded(image, record_property):
    "No registry was involved: the image's first layer is the imported debootstrap base's, and nothing was pulled"
    base = json.loads(docker('image', 'inspect', '-f', '{{json .RootFS.Layers}}', BASE).stdout)
    layers = json.loads(docker('image', 'inspect', '-f', '{{json .RootFS.Layers}}', IMAGE).stdout)
    assert layers[:len(base)] == base
    assert json.loads(docker('image', 'inspect', '-f', '{{json .RepoDigests}}', BASE).stdout) == [], 'the base was never pulled'
    size = int(docker('image', 'inspect', '-f', '{{.Size}}', IMAGE).stdout)
    record_property('image_size_mb', round(size/1e6))
    print(f"{IMAGE}: {size/1e6:.0f} MB")
    assert size < 600e6, f"{size/1e6:.0f} MB: something heavy (PyTorch?) got into the image"


def test_the_image_holds_no_torch_and_runs_as_a_non_root_user(image):
    r = docker('run', '--rm', IMAGE, 'python3', '-c', 'import torch', check=False)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr, r.stderr
    r = docker('run', '--rm', IMAGE, 'python3', '-c', 'import onnxruntime, fastapi, petpark.serve; print("ok")')
    assert r.stdout.strip() == 'ok', 'what it does need is there'
    assert docker('run', '--rm', IMAGE, 'id', '-u').stdout.strip() not in ('', '0')
    assert docker('image', 'inspect', '-f', '{{.Config.User}}', IMAGE).stdout.strip() == 'petpark'


def test_photos_get_predictions_from_the_mounted_model(ctr):
    "Real lake photos through the container's /predict; the non-root server writes its log in the /data volume"
    r = predict(ctr.url, TEST_LAKE/'Cat/1.jpg', TEST_LAKE/'Dog/1.jpg')
    assert r.status_code == 200, r.text
    j = r.json()
    assert [p['file'] for p in j['predictions']] == ['1.jpg', '1.jpg'] and len(j['request_id']) == 32
    for p in j['predictions']: assert p['label'] in ('Cat', 'Dog') and abs(sum(p['probs'].values()) - 1) < 1e-4
    ready = httpx.get(ctr.url + '/ready').json()
    assert ready['status'] == 'ready' and j['model_version'] == ready['model_version']
    assert httpx.get(ctr.url + '/health').json() == {'status': 'ok'}
    v = httpx.get(ctr.url + '/version').json()
    assert v['limits']['max_bytes'] == 300000, 'PETPARK_* variables reach the server'
    n = docker('exec', ctr.name, 'python3', '-c',
               "import sqlite3; print(sqlite3.connect('/data/inference.sqlite').execute('SELECT COUNT(*) FROM predictions').fetchone()[0])")
    assert int(n.stdout) >= 2


@pytest.mark.parametrize('what,name,status,code', [('not an image', 'Cat/notes.jpg', 422, 'not_image'),
                                                   ('10^10-pixel PNG bomb', 'Cat/bomb.png', 413, 'decompression_bomb')])
def test_hostile_inputs_get_a_clear_4xx_and_the_container_keeps_serving(ctr, what, name, status, code):
    p = TEST_LAKE/name
    r = httpx.post(ctr.url + '/predict', files=[('files', (p.name, p.read_bytes(), 'image/jpeg'))], timeout=30)
    assert r.status_code == status, (what, r.text)
    assert r.json()['error'] == code and r.json()['detail'], r.json()
    assert predict(ctr.url, TEST_LAKE/'Dog/2.jpg').status_code == 200


def test_the_health_check_turns_healthy(ctr):
    "Docker's own HEALTHCHECK (GET /ready inside the container) reports the serving container healthy"
    t0 = time.time()
    while (h := ctr.health()) != 'healthy' and time.time() - t0 < 60:
        assert h in ('starting', 'healthy'), f"{h}:\n{ctr.logs()}"
        time.sleep(0.5)
    assert h == 'healthy', ctr.logs()
