"""Production testing on real servers and real photos: a shadow logs both arms, a canary biased to dogs is rolled back
by itself under streamed camera traffic with no failed request, a candidate as good as the champion is stepped up to
100% and becomes prod, an A/B test reaches a decision with its interval, a bandit turns from a worse version"""
import json, shutil, sqlite3, subprocess, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer
import httpx, pytest, yaml
from petpark.proc import Served
from petpark.rollout import rehearsal_candidate
from petpark.testing import lesson_registry
from conftest import ROOT, TEST_LAKE, petpark, venv_env


class Hook(BaseHTTPRequestHandler):
    "The alert webhook: what it is posted, kept"
    got = []
    def do_POST(self):
        Hook.got.append(json.loads(self.rfile.read(int(self.headers['content-length']))))
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass


@pytest.fixture(scope='module')
def park(tmp_path_factory):
    """v1 in prod, served on loopback; candidates: v2 (v1 untouched, as good), v3 (v1 biased to dogs), each with a passed
    pre-production test and a QA approval; a project whose rollout params judge a step on 20 photos; an alert webhook"""
    d = tmp_path_factory.mktemp('rollout')
    reg = lesson_registry(d)
    rehearsal_candidate(reg, 'v1', why='as good as v1'); rehearsal_candidate(reg, 'v1', threshold=0.02, why='biased to dogs')
    for v in ('v1', 'v2', 'v3'): reg.record_preprod(v, True, by='qa'); reg.approve(v, 'qa', 'test')
    reg.promote('v1', 'staging', 'qa'); reg.promote('v1', 'prod', 'qa')
    site = d/'site'; site.mkdir()
    for f in ['pyproject.toml', 'settings.ini']: shutil.copy(ROOT/f, site/f)
    p = yaml.safe_load((ROOT/'params.yaml').read_text())
    p['rollout'].update(min_requests=20, ab_min_effect=0.3)  # an A/B of some 27 labelled photos an arm
    (site/'params.yaml').write_text(yaml.safe_dump(p))
    hook = HTTPServer(('127.0.0.1', 0), Hook); threading.Thread(target=hook.serve_forever, daemon=True).start()
    db = d/'prod.sqlite'
    env = venv_env(PETPARK_REGISTRY_DIR=str(d/'registry'), PETPARK_SERVE_RELOAD_S='0.3', PETPARK_HOST_EVERY_S='1', PETPARK_USER='qa-anna',
                   PETPARK_STAFF_TOKEN='staff', PETPARK_DB_URL=f'sqlite:///{db}', PETPARK_ALERT_WEBHOOK=f'http://127.0.0.1:{hook.server_port}/')
    with Served(['petpark', 'serve', '--stage', 'prod', '--port', '{port}'], env, cwd=site) as srv:
        yield dict(reg=reg, site=site, env=env, url=srv.url, db=db)
    hook.shutdown()


@pytest.fixture(autouse=True)
def no_rollout_left(park):
    "A test that fails mid-way leaves no rollout running for the next"
    yield
    if park['reg'].rollout(): park['reg'].end_rollout('stopped', 'test', 'the test ended')


def stream(park, seconds, feedback=0.0, cameras=40):
    "Camera traffic from the test lake's photos (its bad files included) as `cameras` cameras (0: no camera ids), at 20 photos a second, in the background"
    return subprocess.Popen(['petpark', 'camera', str(TEST_LAKE), '--rate', '20', '--count', str(20*seconds), '--loop', '--cameras', str(cameras),
                             '--feedback', str(feedback), '--url', park['url'], '--quiet'], env=park['env'], cwd=park['site'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(cam):
    out, err = cam.communicate(timeout=300)
    assert cam.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def rollout(park, *args):
    return petpark('rollout', *args, env=park['env'], cwd=park['site'], timeout=240)  # a watch that never ends fails the test


def server_errors(db, since):
    with sqlite3.connect(db) as c: return c.execute('SELECT COALESCE(SUM(n), 0) FROM responses WHERE status >= 500 AND time >= ?', (since,)).fetchone()[0]


def answered_by(park, n=6):
    "Which versions answer the next `n` photos, from as many cameras"
    return {httpx.post(park['url'] + '/predict', content=(TEST_LAKE/'Dog/1.jpg').read_bytes(),
                       headers={'content-type': 'image/jpeg', 'x-camera-id': f'probe-{i}'}).json()['model_version'] for i in range(n)}


def test_a_shadow_logs_both_arms_and_answers_with_the_champion(park):
    r = rollout(park, 'start', 'v3', '--mode', 'shadow', '--note', 'see it on real traffic')
    assert r.returncode == 0 and 'r1: v3 in shadow beside v1' in r.stdout, r.stdout + r.stderr
    time.sleep(1)
    cam = finished(stream(park, 3))
    assert cam['failed'] == 0 and cam['predicted'] > 40, cam
    def both():
        with sqlite3.connect(park['db']) as c:
            return c.execute("SELECT COUNT(*), SUM(p.label != s.label) FROM predictions p JOIN shadow s USING (request_id, item) "
                             "WHERE p.rollout = 'r1' AND s.arm = 'challenger' AND s.model_version = 'v3'").fetchone()
    t = time.time()
    while both()[0] < 0.9*cam['predicted'] and time.time() - t < 60: time.sleep(1)  # the shadow runs on idle cores: it catches up after the burst
    with sqlite3.connect(park['db']) as c: answered = c.execute("SELECT DISTINCT model_version, arm FROM predictions WHERE rollout = 'r1'").fetchall()
    both = both()
    assert answered == [('v1', 'champion')], 'the champion answers every camera'
    assert both[0] >= 0.9*cam['predicted'] and both[1] > 0, f'the challenger scored the same photos, in the shadow: {both}'
    r = rollout(park, 'check')
    assert r.returncode == 0 and r.stdout.startswith('hold: the shadow fails') and 'class share' in r.stdout, r.stdout + r.stderr
    st = rollout(park, 'status').stdout
    assert 'FAIL  disagreement' in st and 'status: running' in st, st
    assert rollout(park, 'stop', '--note', 'biased to dogs').returncode == 0
    assert park['reg'].rollouts()[-1]['status'] == 'stopped'


def test_a_canary_biased_to_dogs_is_rolled_back_by_itself_with_no_failed_request(park):
    t0, Hook.got[:] = time.time(), []
    assert rollout(park, 'start', 'v3', '--mode', 'canary', '--share', '0.5').returncode == 0
    cam = stream(park, 25, feedback=0.5)
    watch = rollout(park, 'watch', '--every', '2')
    tally = finished(cam)
    assert watch.returncode == 0 and 'rollback: failed 3 of 3 rounds in a row' in watch.stdout, watch.stdout + watch.stderr
    ro = park['reg'].rollouts()[-1]
    assert ro['status'] == 'rolled back' and ro['share'] == 0.5
    audit = [a for a in park['reg'].audit_log() if a.get('rollout') == ro['id']]
    assert [a['action'] for a in audit] == ['rollout-start', 'rollout-rollback']
    assert {c['check'] for c in audit[-1]['evidence'] if c['passed'] is False} >= {'class share', 'disagreement'}, 'the rollback keeps its evidence'
    assert [(h['check'], h['action']) for h in Hook.got] == [('rollout', 'rollback')], 'posted to the alert webhook'
    assert tally['failed'] == 0 and server_errors(park['db'], t0) == 0, 'no request failed'
    time.sleep(1)
    assert answered_by(park) == {'v1'}, 'the champion answers every camera again'
    with sqlite3.connect(park['db']) as c:
        per_camera = c.execute("SELECT camera, COUNT(DISTINCT model_version) FROM predictions WHERE rollout = ? GROUP BY camera", (ro['id'],)).fetchall()
        rid, camera = c.execute("SELECT request_id, camera FROM predictions WHERE rollout = ? AND arm = 'challenger' LIMIT 1", (ro['id'],)).fetchone()
    assert len(per_camera) >= 20 and all(n == 1 for _, n in per_camera), 'sticky: each camera met one model'
    r = petpark('lineage', rid, env=park['env'], cwd=park['site'])
    assert f"answered by the challenger (v3) of rollout {ro['id']}, a canary giving v3 50% of cameras" in r.stdout and f'camera {camera} is on' in r.stdout, r.stdout + r.stderr


def test_a_candidate_as_good_as_the_champion_is_stepped_up_to_prod(park):
    assert rollout(park, 'start', 'v2', '--mode', 'canary').returncode == 0
    cam = stream(park, 120, cameras=200)  # at the first step, 10%, some 20 cameras are on the challenger's side
    watch = rollout(park, 'watch', '--every', '2')
    cam.kill(); cam.wait()
    assert watch.returncode == 0 and 'promote: checks pass at 100% of cameras: v2 becomes prod' in watch.stdout, watch.stdout + watch.stderr
    ro = park['reg'].rollouts()[-1]
    steps = [a['share'] for a in park['reg'].audit_log() if a.get('rollout') == ro['id'] and a['action'] == 'rollout-step']
    assert steps == [0.25, 0.5, 1.0] and ro['status'] == 'promoted'
    assert park['reg'].resolve('prod')['version'] == 'v2'
    time.sleep(1)
    assert answered_by(park) == {'v2'}


def test_an_ab_test_reaches_a_decision_with_its_interval(park):
    "v3 (biased to dogs) against v2 in prod, split by request (no camera ids: both arms meet the same mix of photos), decided at its planned size"
    r = rollout(park, 'start', 'v3', '--mode', 'ab')
    assert r.returncode == 0 and 'labelled photos an arm' in r.stdout, r.stdout + r.stderr
    plan = park['reg'].rollout()['plan']
    cam = stream(park, 120, feedback=1.0, cameras=0)
    watch = rollout(park, 'watch', '--every', '2')
    cam.kill(); cam.wait()
    dec = park['reg'].rollouts()[-1]['decision']
    assert watch.returncode == 0 and dec and min(dec['n']) >= plan, watch.stdout + watch.stderr
    assert dec['low'] <= dec['diff'] <= dec['high'] < 0 and '95% interval' in dec['words'], dec
    assert dec['verdict'] == 'challenger worse' and 'v3 is worse; stop it' in dec['words'], dec
    assert 'decision: v3 right on' in rollout(park, 'status').stdout
    assert rollout(park, 'stop').returncode == 0


def test_a_bandit_sends_traffic_away_from_a_worse_version_and_credits_late_labels(park):
    r = rollout(park, 'start', 'v1', '--mode', 'bandit', '--also', 'v3')
    assert r.returncode == 0 and 'v1, v3 in bandit beside v2' in r.stdout, r.stdout + r.stderr
    rid, t0 = park['reg'].rollout()['id'], time.time()
    cam = stream(park, 120, feedback=1.0, cameras=20)
    while time.time() - t0 < 45:
        time.sleep(3); assert rollout(park, 'check').returncode == 0
    cam.kill(); cam.wait()
    with sqlite3.connect(park['db']) as c:
        late = c.execute("SELECT model_version, COUNT(*) FROM predictions WHERE rollout = ? AND time > ? GROUP BY model_version", (rid, t0 + 30)).fetchall()
        old, = c.execute("SELECT request_id FROM predictions WHERE rollout = ? AND model_version = 'v3' AND feedback IS NULL LIMIT 1", (rid,)).fetchone() or (None,)
    share = dict(late); v3 = share.get('v3', 0)/sum(share.values())
    assert v3 < 0.2, f'the version biased to dogs answers less and less: {share}'
    bandit = park['reg'].rollout()['rounds'][-1]['bandit']
    assert bandit['v3']['p_best'] < 0.05 < bandit['v2']['p_best'] + bandit['v1']['p_best'], bandit
    if old:  # a label that comes late is credited to the version that answered, at the next round
        before = park['reg'].rollout()['posterior']['v3']
        assert httpx.post(park['url'] + '/feedback', json=dict(request_id=old, label='Cat'), headers={'X-Staff-Token': 'staff'}).status_code == 200
        assert rollout(park, 'check').returncode == 0
        assert sum(park['reg'].rollout()['posterior']['v3']) == sum(before) + 1
    assert 'P(best)' in rollout(park, 'status').stdout
    r = rollout(park, 'promote', 'v9')
    assert r.returncode == 2 and "'v9' names no version" in r.stderr
    r = rollout(park, 'promote', 'v1', '--note', 'the bandit favours it')
    assert r.returncode == 0 and 'v1 is prod' in r.stdout, r.stdout + r.stderr
    assert park['reg'].resolve('prod')['version'] == 'v1' and park['reg'].rollouts()[-1]['promoted'] == 'v1'


def test_rollout_refusals_are_clear(park):
    r = rollout(park, 'start', 'v9')
    assert r.returncode == 2 and "'v9' names no version" in r.stderr and 'Traceback' not in r.stderr
    r = rollout(park, 'start', 'v3', '--mode', 'blue-green')
    assert r.returncode == 2 and 'choose one of shadow, canary, ab, bandit' in r.stderr
    r = rollout(park, 'start', 'v3', '--mode', 'canary', '--also', 'v1')
    assert r.returncode == 2 and 'only a bandit has more than one challenger' in r.stderr
    r = rollout(park, 'stop')
    assert r.returncode == 2 and 'no rollout is running' in r.stderr
