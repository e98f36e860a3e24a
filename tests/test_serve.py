"A real server on a free loopback port: predictions, hostile inputs, feedback, hot model switch under load, kill -9 durability, docs in a browser"
import os, signal, sqlite3, subprocess, sys, threading, time
from pathlib import Path
import httpx, pytest
from petpark.proc import Served
from petpark.testing import lesson_registry
from conftest import TEST_LAKE, venv_env

LAKE_PHOTOS = [TEST_LAKE/f'{c}/{i}.jpg' for c in ['Cat', 'Dog'] for i in range(1, 13)]


@pytest.fixture(scope='module')
def reg(tmp_path_factory):
    d = tmp_path_factory.mktemp('serve')
    r = lesson_registry(d, [True, False])
    r.promote('v1', 'staging')
    return d, r


class Server(Served):
    "`petpark serve` in a subprocess on a free loopback port, with its own inference log"
    def __init__(self, d:Path, stage='staging', **env):
        self.db = d/f'log-{time.time_ns()}.sqlite'
        e = venv_env(PETPARK_REGISTRY_DIR=str(d/'registry'), PETPARK_SERVE_RELOAD_S='0.3', PETPARK_SERVE_MAX_BYTES='300000',
                     PETPARK_ADMIN_TOKEN='s3cret', PETPARK_STAFF_TOKEN='staff', PETPARK_HOST_EVERY_S='0.5', **env)
        super().__init__(['petpark', 'serve', '--stage', stage, '--port', '{port}', '--db-url', f'sqlite:///{self.db}'], e)


@pytest.fixture(scope='module')
def srv(reg):
    s = Server(reg[0]); yield s; s.stop()


def test_the_server_imports_no_training_stack(env):
    "Serving needs ONNX Runtime, not PyTorch: importing the server (and its runtime) loads no training library"
    code = ("import sys, petpark.serve, petpark.runtime; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastai', 'scipy', 'pandas', 'sklearn', 'timm'}))")
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr


def predict(url, *paths, client=httpx):
    return client.post(url + '/predict', files=[('files', (p.name, p.read_bytes(), 'image/jpeg')) for p in paths], timeout=30)


def test_every_response_is_counted_by_status_for_the_monitor(reg):
    """A server with no room left sheds every /predict with a 503: the counts reach the log's `responses` table (written with
    the host samples and once more when the server stops), and the monitor's server-errors check alerts on them"""
    from petpark.core import load_params
    from petpark.monitor import read_responses, server_error_check
    with Server(reg[0], PETPARK_SERVE_MAX_QUEUE='0') as s:
        t0 = time.time()
        for p in LAKE_PHOTOS[:3]: assert predict(s.url, p).status_code == 503
        assert httpx.get(s.url + '/no-such-page').status_code == 404
    rows = dict(((e, st), n) for e, st, n in sqlite3.connect(s.db).execute('SELECT endpoint, status, SUM(n) FROM responses GROUP BY 1, 2'))
    assert rows[('/predict', 503)] == 3 and rows[('other', 404)] == 1 and rows[('/ready', 200)] >= 1, rows
    c = server_error_check(read_responses(s.db, t0 - 60, time.time() + 1), load_params().monitor)
    assert (c['verdict'], c['value']) == ('alert', 1.0) and '503: 3' in c['words'], c


def test_predictions_and_service_endpoints(srv):
    r = predict(srv.url, TEST_LAKE/'Cat/1.jpg', TEST_LAKE/'Dog/1.jpg')
    assert r.status_code == 200
    j = r.json()
    assert j['model_version'] == 'v1' and len(j['request_id']) == 32 and j['latency_ms'] > 0
    assert [p['file'] for p in j['predictions']] == ['1.jpg', '1.jpg']
    for p in j['predictions']: assert p['label'] in ('Cat', 'Dog') and abs(sum(p['probs'].values()) - 1) < 1e-4
    raw = httpx.post(srv.url + '/predict', content=(TEST_LAKE/'Dog/2.jpg').read_bytes(), headers={'content-type': 'image/jpeg'})
    assert raw.status_code == 200 and raw.json()['predictions'][0]['file'] == 'body'
    assert httpx.get(srv.url + '/health').json() == {'status': 'ok'}
    v = httpx.get(srv.url + '/version').json()
    assert v['stage'] == 'staging' and v['model']['version'] == 'v1' and v['model']['variant'] == 'fp32'
    assert httpx.get(srv.url + '/openapi.json').json()['paths'].keys() >= {'/predict', '/feedback', '/health', '/ready', '/version', '/metrics'}
    met = httpx.get(srv.url + '/metrics').text
    assert 'petpark_requests_total{endpoint="predict",status="200"}' in met and 'petpark_model_info{' in met
    assert httpx.post(srv.url + '/admin/reload').status_code == 403
    assert httpx.post(srv.url + '/admin/reload', headers={'x-admin-token': 's3cret'}).json()['model_version'] == 'v1'


HOSTILE = [  # (what, request kwargs, status, error code)
    ('not an image', dict(files=[('files', ('notes.jpg', (TEST_LAKE/'Cat/notes.jpg').read_bytes(), 'image/jpeg'))]), 422, 'not_image'),
    ('truncated JPEG', dict(files=[('files', ('11702.jpg', (TEST_LAKE/'Dog/11702.jpg').read_bytes(), 'image/jpeg'))]), 422, 'truncated'),
    ('empty file', dict(files=[('files', ('666.jpg', b'', 'image/jpeg'))]), 422, 'empty'),
    ('12x12 photo', dict(files=[('files', ('tiny_1.jpg', (TEST_LAKE/'Dog/tiny_1.jpg').read_bytes(), 'image/jpeg'))]), 422, 'too_small'),
    ('animated GIF', dict(files=[('files', ('anim.gif', (TEST_LAKE/'Cat/anim.gif').read_bytes(), 'image/gif'))]), 422, 'unsupported_format'),
    ('10^10-pixel PNG bomb', dict(files=[('files', ('bomb.png', (TEST_LAKE/'Cat/bomb.png').read_bytes(), 'image/png'))]), 413, 'decompression_bomb'),
    ('file over the byte limit', dict(files=[('files', ('big.jpg', b'\xff\xd8' + os.urandom(400_000), 'image/jpeg'))]), 413, 'too_large'),
    ('raw body over the byte limit', dict(content=b'\xff\xd8' + os.urandom(400_000), headers={'content-type': 'image/jpeg'}), 413, 'too_large'),
    ('17 files', dict(files=[('files', (f'{i}.jpg', (TEST_LAKE/'Cat/1.jpg').read_bytes(), 'image/jpeg')) for i in range(17)]), 413, 'too_many_files'),
    ('text body', dict(content=b'hello', headers={'content-type': 'text/plain'}), 415, 'unsupported_media_type'),
    ('no content type', dict(content=b'hello'), 415, 'unsupported_media_type'),
    ('form without files', dict(data={'x': '1'}, files=[('other', ('', b'', 'text/plain'))]), 422, 'no_files'),
    ('one bad photo among good ones', dict(files=[('files', ('1.jpg', (TEST_LAKE/'Cat/1.jpg').read_bytes(), 'image/jpeg')),
                                                  ('files', ('broken.jpg', (TEST_LAKE/'Cat/broken.jpg').read_bytes(), 'image/jpeg'))]), 422, None),
]


@pytest.mark.parametrize('what,kw,status,code', HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_inputs_get_a_clear_4xx_and_the_server_keeps_serving(srv, what, kw, status, code):
    before = sqlite3.connect(srv.db).execute('SELECT COUNT(*) FROM predictions').fetchone()[0]
    r = httpx.post(srv.url + '/predict', timeout=30, **kw)
    assert r.status_code == status, (what, r.text)
    j = r.json()
    assert j['detail'] and (code is None or j['error'] == code), j
    assert sqlite3.connect(srv.db).execute('SELECT COUNT(*) FROM predictions').fetchone()[0] == before, 'nothing logged for a refused request'
    assert predict(srv.url, TEST_LAKE/'Cat/2.jpg').status_code == 200


def test_feedback_is_recorded_against_the_logged_prediction(srv):
    rid = predict(srv.url, TEST_LAKE/'Cat/3.jpg', TEST_LAKE/'Dog/3.jpg').json()['request_id']
    staff = {'X-Staff-Token': 'staff'}
    r = httpx.post(srv.url + '/feedback', json={'request_id': rid, 'label': 'Dog', 'item': 1})
    assert r.status_code == 403 and 'X-Staff-Token' in r.json()['detail'], 'labels become training data: staff only'
    assert httpx.post(srv.url + '/feedback', json={'request_id': rid, 'label': 'Dog', 'item': 1}, headers={'X-Staff-Token': 'guess'}).status_code == 403
    assert httpx.post(srv.url + '/feedback', json={'request_id': rid, 'label': 'Dog', 'item': 1}, headers=staff).json() == {'updated': 1}
    assert httpx.post(srv.url + '/feedback', json={'request_id': 'nope', 'label': 'Dog'}, headers=staff).status_code == 404
    assert httpx.post(srv.url + '/feedback', json={'request_id': rid, 'label': 'Horse'}, headers=staff).status_code == 422
    assert httpx.post(srv.url + '/feedback', content=b'{', headers={'content-type': 'application/json', **staff}).status_code == 400
    rows = sqlite3.connect(srv.db).execute('SELECT item, feedback, model_version, length(embedding), input_sha256, stage, saturation FROM predictions WHERE request_id=? ORDER BY item', (rid,)).fetchall()
    assert rows[0][1] is None and rows[1][1] == 'Dog' and rows[1][2] == 'v1' and rows[1][3] == 512*4 and len(rows[1][4]) == 64
    assert rows[1][5] == 'staging' and rows[1][6] > 0
    kept = srv.db.parent/'photos'/rows[1][4][:2]/f'{rows[1][4]}.img'
    assert kept.read_bytes() == (TEST_LAKE/'Dog/3.jpg').read_bytes(), 'the photo is kept by content hash, for retraining'
    assert httpx.post(srv.url + '/feedback', json={'request_id': rid, 'label': 'Dog', 'item': 10**30}, headers=staff).status_code == 422, \
        'an item past any request is refused, not an overflow in the log (schemathesis found the 500)'


def test_the_api_schema_tells_the_truth(reg, env):
    """Schemathesis, an outside OpenAPI fuzzer, runs every check against a live server: requests valid by the schema are
    accepted (its uploads are real lake photos, see schemathesis_hooks.py), invalid ones refused with a documented
    status and body, answers match their declared models and content types, both tokens enforced, no 5xx"""
    s = Server(reg[0])  # its own server: the fuzzer logs hundreds of predictions
    try:
        here = Path(__file__).parent
        r = subprocess.run(['schemathesis', '--config-file', 'schemathesis.toml', 'run', s.url + '/openapi.json', '--checks', 'all',
                            '-H', 'X-Admin-Token: s3cret', '-H', 'X-Staff-Token: staff', '--max-examples', '40', '--seed', '1'],
                           cwd=here, env={**env, 'SCHEMATHESIS_HOOKS': 'schemathesis_hooks', 'PYTHONPATH': str(here)},
                           capture_output=True, text=True, timeout=600)
    finally: s.stop()
    summary = r.stdout[r.stdout.find('SUMMARY'):]
    assert r.returncode == 0 and 'No issues found' in summary and 'Tested: 7' in summary, r.stdout[-6000:] + r.stderr[-2000:]


def test_above_capacity_the_server_sheds_load_with_503_and_retry_after(reg):
    "A burst past serve_max_queue: the excess is refused at once with 503 and Retry-After, nothing else fails, and the server serves afterwards"
    s = Server(reg[0], PETPARK_SERVE_MAX_QUEUE='1')
    photos = [TEST_LAKE/f'{c}/{i}.jpg' for c in ['Cat', 'Dog'] for i in range(1, 9)]  # 16 photos a request: each takes a while
    try:
        got = []
        for _ in range(5):  # bursts until one overlaps (it does at once on any machine; no clock is asserted)
            start = threading.Barrier(8)
            def one(start=start):
                start.wait()
                r = predict(s.url, *photos)
                got.append((r.status_code, r.headers.get('retry-after'), r.json()))
            burst = [threading.Thread(target=one) for _ in range(8)]
            for t in burst: t.start()
            for t in burst: t.join()
            if any(c == 503 for c, _, _ in got): break
        shed = [(h, j) for c, h, j in got if c == 503]
        assert shed and all(h == '1' and j['error'] == 'overloaded' and 'serve_max_queue' in j['detail'] for h, j in shed), got[:3]
        assert {c for c, _, _ in got} <= {200, 503}, [c for c, _, _ in got]
        assert any(c == 200 for c, _, _ in got)
        assert predict(s.url, TEST_LAKE/'Cat/1.jpg').status_code == 200, 'still serving after the burst'
        assert 'petpark_requests_total{endpoint="predict",status="503"}' in httpx.get(s.url + '/metrics').text
    finally: s.stop()


def test_the_server_records_the_hosts_telemetry(srv):
    time.sleep(1.2)
    rows = sqlite3.connect(srv.db).execute('SELECT stage, cpu_pct, mem_pct, disk_pct, rss_mb FROM host').fetchall()
    assert len(rows) >= 2 and all(r[0] == 'staging' and 0 <= r[1] <= 100 and 0 < r[2] <= 100 and 0 < r[3] <= 100 and r[4] > 10 for r in rows)
    m = httpx.get(srv.url + '/metrics').text
    assert 'petpark_host{fact="mem_pct"}' in m and 'petpark_host{fact="disk_pct"}' in m


def load(url, stop, out, paths=LAKE_PHOTOS):
    "Send requests until `stop` is set; record (status, model version or error) of each"
    with httpx.Client(timeout=30) as c:
        i = 0
        while not stop.is_set():
            try:
                r = predict(url, paths[i % len(paths)], client=c)
                out.append((r.status_code, r.json().get('model_version'), r.json().get('request_id')))
            except Exception as e: out.append((0, repr(e), None))
            i += 1


def test_promotion_and_rollback_switch_models_under_load_without_failures(srv, reg):
    d, r = reg
    stop, out = threading.Event(), []
    workers = [threading.Thread(target=load, args=(srv.url, stop, out)) for _ in range(3)]
    for w in workers: w.start()
    try:
        time.sleep(1); r.promote('v2', 'staging', by='test')
        deadline = time.time() + 30
        while time.time() < deadline and not any(v == 'v2' for _, v, _ in out[-5:]): time.sleep(0.2)
        time.sleep(1); r.rollback('staging', by='test')
        deadline = time.time() + 30
        while time.time() < deadline and not (out and out[-1][1] == 'v1' and any(v == 'v2' for _, v, _ in out)): time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers: w.join()
    seen = [v for _, v, _ in out]
    assert all(s == 200 for s, _, _ in out), [o for o in out if o[0] != 200][:3]
    assert 'v2' in seen and seen[-1] == 'v1' and len(out) > 20, (len(out), set(seen))
    assert httpx.get(srv.url + '/version').json()['model']['version'] == 'v1'


def test_every_acknowledged_prediction_survives_kill_9(reg):
    d, _ = reg
    s = Server(d)
    stop, out = threading.Event(), []
    workers = [threading.Thread(target=load, args=(s.url, stop, out)) for _ in range(3)]
    for w in workers: w.start()
    time.sleep(3)
    s.proc.send_signal(signal.SIGKILL); s.proc.wait()
    stop.set()
    for w in workers: w.join()
    acked = {rid for status, _, rid in out if status == 200}
    assert len(acked) >= 5
    logged = {r[0] for r in sqlite3.connect(s.db).execute('SELECT request_id FROM predictions')}
    assert acked <= logged, f'{len(acked - logged)} acknowledged predictions missing from the log'


def test_openapi_page_loads_in_a_headless_browser(srv):
    if not Path('/usr/bin/chromium').exists(): pytest.skip('no /usr/bin/chromium: apt-get install chromium (.ci/run does)')
    import playwright.sync_api as pw
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium',
                              args=['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        page = b.new_page()
        page.goto(srv.url + '/docs')
        page.wait_for_selector('text=/predict', timeout=30000)
        assert 'petpark' in page.content() and page.locator('text=/feedback').count() >= 1
        b.close()
