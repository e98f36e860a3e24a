"The monitor on real servers and real lake photos: untouched photos raise no drift alert, night and infrared photos do, a biased model raises the bias alert, an alert reaches the webhook once"
import io, json, sqlite3, threading, time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
import httpx, pandas as pd, pytest
from PIL import Image, ImageFilter
from petpark.core import load_params, override
from petpark.monitor import build_reference, save_reference, load_reference, monitor_window, monitor_stage
from petpark.registry import Registry
from petpark.runtime import load_dir
from petpark.proc import Served
from petpark.testing import lesson_package
from conftest import LAKE, petpark, venv_env

P = override(load_params(), {'monitor.min_photos': 40, 'monitor.min_feedback': 20}).monitor
lake_photos = lambda c, start, n: sorted(p for p in (LAKE/c).glob('*.jpg') if p.stem.isdigit())[start:start + n]


def night(p):  # a night camera: dark, noisy, soft
    im = Image.open(p).convert('RGB').point(lambda v: v//4).filter(ImageFilter.GaussianBlur(1.5))
    b = io.BytesIO(); im.save(b, 'JPEG'); return b.getvalue()

def infrared(p):  # an infrared camera: grayscale with a cast
    g = Image.open(p).convert('L')
    b = io.BytesIO(); Image.merge('RGB', (g, g.point(lambda v: int(v*0.8)), g.point(lambda v: int(v*0.6)))).save(b, 'JPEG'); return b.getvalue()


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "A tiny model registered with a reference of 60 lake photos, served from the registry's prod stage on loopback"
    d = tmp_path_factory.mktemp('monitor')
    files = lesson_package(d)
    ref = build_reference(load_dir(d/'pkg'), lake_photos('Cat', 0, 30) + lake_photos('Dog', 0, 30), pd.read_csv(d/'valid_preds.csv'))
    save_reference(ref, d/'pkg/reference.npz')
    reg = Registry(d/'registry', 'petpark-classifier')
    reg.register(files, dict(gate={'passed': True, 'reasons': []}))
    reg.record_preprod('v1', True, by='test'); reg.approve('v1', 'test', 'ok'); reg.promote('v1', 'staging'); reg.promote('v1', 'prod')
    env = venv_env(PETPARK_REGISTRY_DIR=str(d/'registry'), PETPARK_DB_URL=f'sqlite:///{d}/prod.sqlite', PETPARK_STAFF_TOKEN='staff')
    with Served(['petpark', 'serve', '--stage', 'prod', '--port', '{port}'], env) as s:
        yield d, s, env


def send(url, bodies, labels=None):
    "Post photos one a request, as the camera does; post staff feedback where `labels` gives it; the time window they took"
    t0 = time.time()
    with httpx.Client(timeout=30) as c:
        for i, b in enumerate(bodies):
            r = c.post(url + '/predict', files=[('files', (f'{i}.jpg', b, 'image/jpeg'))]).json()
            if labels: c.post(url + '/feedback', json=dict(request_id=r['request_id'], label=labels[i], item=0), headers={'X-Staff-Token': 'staff'})
    return t0, time.time()


def drift_alerts(checks): return [c['check'] for c in checks if c['check'].startswith('data drift') and c['verdict'] == 'alert']


def test_untouched_photos_raise_no_drift_and_shifted_photos_do(site):
    d, s, env = site
    ref = load_reference(d/'pkg/reference.npz')
    photos = lake_photos('Cat', 100, 30) + lake_photos('Dog', 100, 30)  # never in the reference
    day = send(s.url, [p.read_bytes() for p in photos])
    checks = monitor_window(d/'prod.sqlite', ref, 'Dog', *day, P)
    assert drift_alerts(checks) == [], checks
    assert {c['check'] for c in checks} >= {'refused inputs', 'latency', 'data drift: embeddings (MMD)', 'prediction drift', 'bias', 'model drift'}
    for shift in (night, infrared):
        w = send(s.url, [shift(p) for p in photos])
        found = drift_alerts(monitor_window(d/'prod.sqlite', ref, 'Dog', *w, P))
        assert 'data drift: embeddings (MMD)' in found or 'data drift: brightness' in found, (shift.__name__, found)


def test_a_biased_model_raises_the_bias_alert(site, tmp_path):
    "The same network with a threshold that calls nearly everything a dog, judged by staff feedback"
    d, s, env = site
    biased = tmp_path/'biased'; biased.mkdir()
    for f in (d/'pkg').iterdir(): biased.joinpath(f.name).write_bytes(f.read_bytes())
    sv = json.loads((biased/'serving.json').read_text()); sv['threshold'] = 0.02; (biased/'serving.json').write_text(json.dumps(sv))
    photos = lake_photos('Cat', 200, 25) + lake_photos('Dog', 200, 25)
    with Served(['petpark', 'serve', '--model-dir', biased, '--port', '{port}', '--db-url', f'sqlite:///{tmp_path}/log.sqlite'], env) as b:
        w = send(b.url, [p.read_bytes() for p in photos], ['Cat']*25 + ['Dog']*25)
    checks = {c['check']: c for c in monitor_window(tmp_path/'log.sqlite', load_reference(d/'pkg/reference.npz'), 'Dog', *w, P)}
    assert checks['bias']['verdict'] == 'alert' and 'predicts dog' in checks['bias']['words'] and 'more often than it should' in checks['bias']['words']
    assert 'staff feedback' in checks['bias']['words'] and checks['model drift']['verdict'] == 'alert'


class Receiver(BaseHTTPRequestHandler):
    got = []
    def do_POST(self):
        Receiver.got.append(json.loads(self.rfile.read(int(self.headers['content-length']))))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass


def test_alerts_reach_the_webhook_once_and_clear(site):
    d, s, env = site
    hook = HTTPServer(('127.0.0.1', 0), Receiver); threading.Thread(target=hook.serve_forever, daemon=True).start()
    env = dict(env, PETPARK_ALERT_WEBHOOK=f'http://127.0.0.1:{hook.server_port}/alerts')
    photos = lake_photos('Cat', 300, 50) + lake_photos('Dog', 300, 50)  # params.yaml's monitor.min_photos: 100
    fmt = lambda t: datetime.fromtimestamp(t).isoformat()  # to the microsecond: the window holds these photos and none the tests before logged
    since, until = send(s.url, [night(p) for p in photos])
    run = lambda *a: petpark('monitor', '--since', fmt(since), '--until', fmt(until), *a, env=env)
    r = run()
    assert r.returncode == 0, r.stderr
    assert 'ALERT (warning) data drift' in r.stdout and 'action:' in r.stdout, r.stdout
    first = len(Receiver.got)
    assert first >= 1 and all(a['check'] and a['words'] for a in Receiver.got)
    r = run('--as-json')
    res = json.loads(r.stdout)
    assert res['alerts']['opened'] == [] and res['alerts']['open'], 'a condition that stays bad keeps its one alert'
    assert len(Receiver.got) == first, 'and it is posted once'
    assert {c['verdict'] for c in res['checks']} <= {'ok', 'alert', 'n/a'} and all('threshold' in c for c in res['checks'])
    stored = sqlite3.connect(d/'prod.sqlite').execute('SELECT COUNT(*) FROM alerts WHERE closed IS NULL').fetchone()[0]
    assert stored == len(res['alerts']['open'])
    hook.shutdown()
    # the DVC stage's way: the window exported to a folder, then checked from that folder alone
    r = run('--export', str(d/'window'))
    assert r.returncode == 0 and '100 photos served by v1 on prod servers' in r.stdout, r.stdout + r.stderr
    rep = monitor_stage(override(load_params(), {}), d/'window', d/'monitor.json')
    assert drift_alerts(rep['checks']) and len(rep['alerts']) == stored, 'the report shows the checks and the alerts still open'
    m = json.loads((d/'monitor.json').read_text())
    assert m['window']['version'] == 'v1' and m['verdicts']['alert'] >= 1 and all({'check', 'verdict', 'statistic', 'value', 'threshold'} <= set(c) for c in m['checks'])


def test_refused_inputs_are_logged_without_their_bytes(site):
    d, s, env = site
    httpx.post(s.url + '/predict', files=[('files', ('notes.jpg', b'not a photo', 'image/jpeg'))])
    row = sqlite3.connect(d/'prod.sqlite').execute('SELECT * FROM refusals ORDER BY time DESC LIMIT 1').fetchone()
    assert row[1:4] == ('not_image', 422, 'notes.jpg')
