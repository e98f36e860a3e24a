"The inference log, the monitor and the server replicas on a real PostgreSQL server (started by conftest's `pg_server` on loopback)"
import os, time
import pytest
from petpark.db import Db, log_exists


def test_one_dialect_on_postgres(pg_url):
    assert not log_exists(pg_url)
    with Db(pg_url) as db:
        db.script('CREATE TABLE IF NOT EXISTS p(time REAL, label TEXT, probs TEXT, e BLOB); CREATE TABLE IF NOT EXISTS a(id INTEGER PRIMARY KEY, w TEXT)')
        with db.transaction(): db.executemany('INSERT INTO p(time, label, probs, e) VALUES (?,?,?,?)',
                                              [(1.7e9 + 86400*i + 0.125, l, f'{{"Dog": {0.2 + 0.3*i}}}', b'\x00\x01') for i, l in enumerate(['Cat', 'Dog', 'Dog'])])
        assert db.columns('p') == ['rowid', 'time', 'label', 'probs', 'e'] and db.columns('nope') == []
        f = db.frame(f"SELECT {db.day()} AS day, AVG(CASE WHEN label = ? THEN 1.0 ELSE 0 END) share, AVG({db.json_num('probs', 'Dog')}) p, "
                     "MAX(time) t FROM p GROUP BY 1 ORDER BY 1", ('Dog',))
        assert f.share.tolist() == [0.0, 1.0, 1.0] and abs(f.p[2] - 0.8) < 1e-9 and f.t[0] == 1.7e9 + 0.125
        assert db.execute('SELECT e FROM p').fetchone()[0] == b'\x00\x01'
        db.execute('INSERT INTO a(w) VALUES (?)', ('x',)); assert db.execute('SELECT id FROM a').fetchone()[0] == 1
    with Db(pg_url, readonly=True) as ro:
        with pytest.raises(Exception, match='read-only'): ro.execute('DELETE FROM p')


import re, signal, threading
import httpx, psutil
from petpark.govern import lineage
from petpark.monitor import export_window, open_alerts
from petpark.proc import Served
from petpark.testing import lesson_registry
from conftest import TEST_LAKE, petpark, venv_env

PHOTOS = [TEST_LAKE/f'{c}/{i}.jpg' for c in ['Cat', 'Dog'] for i in range(1, 13)]


@pytest.fixture(scope='module')
def reg(tmp_path_factory):
    "A lesson model registered and promoted to prod (its package carries a reference for the monitor)"
    d = tmp_path_factory.mktemp('pg')
    r = lesson_registry(d)
    r.record_preprod('v1', True, by='test'); r.approve('v1', 'test', 'ok'); r.promote('v1', 'staging'); r.promote('v1', 'prod')
    return d, r


def site_env(d, url, **more):
    return venv_env(PETPARK_REGISTRY_DIR=str(d/'registry'), PETPARK_DB_URL=url, PETPARK_STAFF_TOKEN='staff', PETPARK_PHOTO_DIR=str(d/'photos'),
                    PETPARK_SERVE_RELOAD_S='0.5', PETPARK_HOST_EVERY_S='0.5', **more)


def test_serve_feedback_and_monitor_on_postgres(reg, pg_url, tmp_path):
    "A server logs into PostgreSQL; staff feedback lands there; `petpark monitor` reads it, aggregates, and stores its alerts there"
    d, r = reg
    env = site_env(d, pg_url)
    ids = []
    with Served(['petpark', 'serve', '--stage', 'prod', '--port', '{port}'], env) as s, httpx.Client(timeout=30) as c:
        for i, p in enumerate(PHOTOS + PHOTOS[:16]):  # 40 photos, each labelled by staff with its folder's label
            j = c.post(s.url + '/predict', files=[('files', (p.name, p.read_bytes(), 'image/jpeg'))]).json()
            ids.append(j['request_id'])
            fb = c.post(s.url + '/feedback', json=dict(request_id=j['request_id'], label=p.parent.name, item=0), headers={'X-Staff-Token': 'staff'})
            assert fb.json() == {'updated': 1}, fb.text
        for _ in range(5):  # a camera sending text files: refused, and logged as refusals
            assert c.post(s.url + '/predict', files=[('files', ('notes.jpg', b'not a photo', 'image/jpeg'))]).status_code == 422
        time.sleep(1.2)  # a host sample or two
    with Db(pg_url, readonly=True) as db:
        assert db.execute('SELECT COUNT(*), COUNT(feedback), COUNT(DISTINCT request_id) FROM predictions').fetchone() == (40, 40, 40)
        assert sorted(r[0] for r in db.execute('SELECT request_id FROM predictions')) == sorted(ids)
        assert db.execute("SELECT COUNT(*) FROM refusals WHERE problem = 'not_image' AND stage = 'prod'").fetchone()[0] == 5
        assert db.execute('SELECT COUNT(*) FROM host').fetchone()[0] >= 1
        emb = db.execute('SELECT embedding FROM predictions LIMIT 1').fetchone()[0]
        assert isinstance(emb, bytes) and len(emb) % 4 == 0
    out = petpark('monitor', '--last', 1, '--db-url', pg_url, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'ALERT (warning) refused inputs: 11.1% of inputs refused (not_image 5)' in out.stdout, out.stdout
    assert '40 photos, ' in out.stdout and 'accuracy from staff feedback' in out.stdout, out.stdout
    again = petpark('monitor', '--last', 1, '--db-url', pg_url, env=env)
    assert 'still open: refused inputs' in again.stdout, again.stdout
    a = open_alerts(pg_url)
    assert 'refused inputs' in a.check_name.tolist() and all(f'ALERT ({v}) {k}:' in out.stdout for k, v in zip(a.check_name, a.severity))
    info = export_window(pg_url, tmp_path/'window', time.time() - 3600, time.time() + 1, 'prod', r)
    assert info['photos'] == 40 and info['version'] == 'v1'
    assert lineage(ids[0], pg_url, r)['model']['version'] == 'v1'


def workers_of(pid:int)->list:
    "The uvicorn worker processes of the server `pid` (spawned children, not multiprocessing's resource tracker)"
    def worker(c):
        try: return c.status() != psutil.STATUS_ZOMBIE and 'spawn_main' in ' '.join(c.cmdline())
        except psutil.Error: return False  # gone, or a killed one not yet reaped
    return [c for c in psutil.Process(pid).children() if worker(c)]


def metric(text:str, line:str)->float:
    m = re.search(re.escape(line) + r' ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def test_two_workers_survive_kill_9_and_log_every_answer_once(reg, pg_url):
    "`petpark serve --workers 2` on PostgreSQL under load: one worker killed with SIGKILL; every 200 is logged exactly once, the server keeps answering, the master restarts the worker, /metrics adds up"
    d, r = reg
    acked, failed, stop, killed_at = [], [], threading.Event(), []
    body = (TEST_LAKE/'Dog/1.jpg').read_bytes()

    def load():
        c = httpx.Client(timeout=30)
        while not stop.is_set():
            try:
                res = c.post(s.url + '/predict', files=[('files', ('1.jpg', body, 'image/jpeg'))])
                if res.status_code == 200: acked.append((time.time(), res.json()['request_id']))
                else: failed.append(res.status_code)
            except httpx.HTTPError as e: failed.append(type(e).__name__); c.close(); c = httpx.Client(timeout=30)
        c.close()

    with Served(['petpark', 'serve', '--stage', 'prod', '--workers', '2', '--port', '{port}'], site_env(d, pg_url)) as s:
        deadline = time.time() + 120
        while len(workers_of(s.proc.pid)) < 2 and time.time() < deadline: time.sleep(0.2)
        before = {w.pid for w in workers_of(s.proc.pid)}
        assert len(before) == 2, before
        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for t in threads: t.start()
        try:
            while len(acked) < 40 and time.time() < deadline: time.sleep(0.1)
            victim = sorted(before)[0]
            os.kill(victim, signal.SIGKILL); killed_at.append(time.time())
            while time.time() < deadline:  # the survivor answers, and the master brings a second worker back
                now = {w.pid for w in workers_of(s.proc.pid)}
                if len(now) == 2 and victim not in now and sum(t > killed_at[0] + 1 for t, _ in acked) >= 20: break
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads: t.join()
        after = {w.pid for w in workers_of(s.proc.pid)}
        assert len(after) == 2 and victim not in after, (before, after)
        met = httpx.get(s.url + '/metrics').text
    ok_after = sum(t > killed_at[0] for t, _ in acked)
    assert ok_after >= 20, (ok_after, failed[:10])
    with Db(pg_url, readonly=True) as db:
        logged = db.execute('SELECT request_id, COUNT(*) FROM predictions GROUP BY request_id').fetchall()
    counts = dict(logged)
    ids = [i for _, i in acked]
    assert len(set(ids)) == len(ids) and all(counts.get(i) == 1 for i in ids), 'every acknowledged request logged exactly once'
    assert max(counts.values()) == 1
    total = metric(met, 'petpark_requests_total{endpoint="predict",status="200"}')
    assert len(ids) <= total <= len(counts), (len(ids), total, len(counts))  # both workers' counts, the dead one's included
    print(f'{len(ids)} answered (200), {len(failed)} failed while the worker died ({sorted(set(map(str, failed)))}), {len(counts)} logged, '
          f'{ok_after} answered after the kill; /metrics counts {total:g}')
