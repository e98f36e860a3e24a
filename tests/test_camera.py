"""The park's cameras: a live RTSP stream (an H.264 video of lake photos, served on loopback by a real RTSP server) into a
prod server, frames sampled and still ones skipped, a cut stream reconnected, every prediction under the camera's id,
the camera in the monitor's report, and no face left unblurred in the photo store"""
import json, socket, sqlite3, subprocess, sys, time
from pathlib import Path
import pytest
from PIL import Image
from petpark.camera import photo_video
from petpark.core import lake_path
from petpark.faces import FaceFinder
from petpark.proc import Served, free_port
from petpark.testing import lesson_registry
from conftest import TEST_LAKE, petpark, venv_env

FACE = 'Cat/10536.jpg'  # a lake photo of a woman holding her cat


class RTSPServer:
    "aio-rtsp-toolkit's RTSP server publishing the files of `folder` at rtsp://127.0.0.1:`port`/NAME, started and killed at will"
    def __init__(self, folder, port, log): self.folder, self.port, self.log, self.proc = folder, port, log, None

    def start(self):
        code = 'import asyncio, sys; import aio_rtsp_toolkit.server as s; asyncio.run(s.serve(sys.argv[1], "127.0.0.1", int(sys.argv[2])))'
        self.proc = subprocess.Popen([sys.executable, '-c', code, str(self.folder), str(self.port)], stdout=open(self.log, 'ab'), stderr=subprocess.STDOUT)
        for _ in range(100):
            try: socket.create_connection(('127.0.0.1', self.port), 0.2).close(); return self
            except OSError: time.sleep(0.1)
        raise RuntimeError(f'the RTSP server did not start: {Path(self.log).read_text()[-2000:]}')

    def kill(self): self.proc.kill(); self.proc.wait()


@pytest.fixture(scope='module')
def park(tmp_path_factory):
    "A prod server of the tiny lesson model (its log and photo store in a temporary folder), and a camera's video on an RTSP server"
    d = tmp_path_factory.mktemp('cameras')
    reg = lesson_registry(d)
    reg.promote('v1', 'staging', by='test'); reg.record_preprod('v1', True, by='qa'); reg.approve('v1', 'qa', 'test'); reg.promote('v1', 'prod', by='test')
    photos = [lake_path()/FACE] + [TEST_LAKE/f'{c}/{i}.jpg' for i in range(1, 6) for c in ('Cat', 'Dog')]
    photo_video(photos, d/'rtsp/cam.mp4')  # 11 photos, each held a second at 10 frames a second
    env = venv_env(PETPARK_REGISTRY_DIR=str(d/'registry'), PETPARK_SERVE_RELOAD_S='0.3')
    rtsp = RTSPServer(d/'rtsp', free_port(), d/'rtsp.log').start()
    with Served(['petpark', 'serve', '--stage', 'prod', '--port', '{port}', '--db-url', f'sqlite:///{d}/log.sqlite'], env) as api:
        yield d, env, api, rtsp
    rtsp.kill()


def test_an_rtsp_camera_feeds_prod_through_a_cut(park):
    d, env, api, rtsp = park
    url = f'rtsp://127.0.0.1:{rtsp.port}/cam.mp4'
    cam = subprocess.Popen(['petpark', 'camera', url, '--fps', '4', '--count', '26', '--url', api.url], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = sqlite3.connect(d/'log.sqlite')
    t0 = time.time()
    while log.execute('SELECT COUNT(*) FROM predictions').fetchone()[0] < 5:  # frames arrive...
        assert time.time() - t0 < 60 and cam.poll() is None, cam.communicate()
        time.sleep(0.2)
    rtsp.kill(); time.sleep(1.5); rtsp.start()  # ...the stream is cut, and comes back
    out, err = cam.communicate(timeout=180)
    assert cam.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(res))  # frames decoded and sent a second, still frames skipped, reconnections: the closing note's figures
    assert res['sent'] == res['predicted'] == 26 and res['failed'] == 0 and not res['refused'], res
    assert res['reconnects'] >= 1 and f'{url}: ' in out and 'reconnecting in' in out, out[-3000:]  # the cut, said in a line
    assert res['still'] >= res['sent'], res  # a photo is held for four sampled frames: three are still, skipped
    assert res['decoded'] >= res['sampled'] > res['sent'] and res['decoded_per_s'] > 0 and res['sent_per_s'] > 0
    assert log.execute('SELECT DISTINCT camera FROM predictions').fetchall() == [(f'127.0.0.1:{rtsp.port}/cam.mp4',)]
    assert log.execute('SELECT MAX(faces) FROM predictions').fetchone()[0] >= 1, 'the woman in the first photo'
    # the monitor's report names the camera, with its photos and request rate
    r = petpark('monitor', '--stage', 'prod', '--db-url', f'sqlite:///{d}/log.sqlite', '--last', '1', env=env)
    assert r.returncode == 0, r.stderr
    assert f'camera 127.0.0.1:{rtsp.port}/cam.mp4: 26 photos' in r.stdout and 'an hour' in r.stdout, r.stdout


def test_no_stored_photo_shows_a_face(park):
    "After the stream (the test above), every photo the server kept: no face that CenterFace finds even at a lower threshold"
    d, env, api, rtsp = park
    kept = sorted((d/'photos').glob('*/*.img'))
    faces = sqlite3.connect(d/'log.sqlite').execute('SELECT COUNT(*) FROM predictions WHERE faces >= 1').fetchone()[0]
    assert kept and faces >= 1
    finder = FaceFinder(threshold=0.3)
    found = {p.name: len(finder(Image.open(p))) for p in kept}
    assert not any(found.values()), found


def test_a_source_that_cannot_be_opened_is_one_line(park):
    d, env, api, rtsp = park
    r = petpark('camera', f'rtsp://127.0.0.1:{free_port()}/cam', '--url', api.url, env=env)
    assert r.returncode == 2 and 'cannot be opened (Connection refused)' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = petpark('camera', d/'no-such.mp4', '--url', api.url, env=env)
    assert r.returncode == 2 and 'no such folder or video file' in r.stderr, r.stderr
