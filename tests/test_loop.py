"""The park's loop on Prefect, for real: `petpark loop start|status|stop` on loopback, on SQLite and on PostgreSQL; a
schedule that neither loses nor repeats a run across a restart; one retrain at a time; and a rehearsed fortnight on a
rehearsal site (a real pipeline, a live prod server on a fast clock, camera traffic and staff labels), with a retrain
killed by kill -9 at its end"""
import json, os, signal, sqlite3, subprocess, time
from datetime import datetime, timezone
import httpx, pytest
from petpark.proc import free_port
from conftest import petpark, venv_env


def loop_env(tmp_path, **extra):
    "A loop of its own: its Prefect home, port, registry and log in `tmp_path`"
    return venv_env(PETPARK_LOOP_HOME=str(tmp_path/'prefect'), PETPARK_LOOP_PORT=str(free_port()), PETPARK_REGISTRY_DIR=str(tmp_path/'registry'),
                    PETPARK_DB_URL=f'sqlite:///{tmp_path}/log.sqlite', PETPARK_LOOP_LAKE_EVERY_S='86400', **extra)


def runs(env, deployment, before:float=None):
    "The deployment's flow runs (expected to start before `before`, if given), oldest expected first"
    api = f"http://127.0.0.1:{env['PETPARK_LOOP_PORT']}/api"
    dep = [d['id'] for d in httpx.post(api + '/deployments/filter', json={}).json() if d['name'] == deployment]
    when = {'flow_runs': {'expected_start_time': {'before_': datetime.fromtimestamp(before, timezone.utc).isoformat()}}} if before else {}
    return httpx.post(api + '/flow_runs/filter', json={'deployments': {'id': {'any_': dep}}, 'sort': 'EXPECTED_START_TIME_ASC', 'limit': 200, **when}).json()


def wait_for(what, timeout, every=3):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (got := what()): return got
        time.sleep(every)
    return what()


def test_the_loop_serves_its_deployments_and_keeps_its_schedule_across_a_restart(tmp_path):
    env = loop_env(tmp_path, PETPARK_LOOP_CRON='* * * * *')  # the morning monitor every minute: a schedule to watch
    r = petpark('loop', 'start', env=env)
    try:
        assert r.returncode == 0, r.stderr
        assert all(d in r.stdout for d in ('daily-monitor', 'watch-lake', 'retrain', 'weekly-summary')), r.stdout
        api = f"http://127.0.0.1:{env['PETPARK_LOOP_PORT']}"
        assert httpx.get(api + '/api/health').json() is True and httpx.get(api + '/').status_code == 200, 'the API and the UI on loopback'
        retrain = next(d for d in httpx.post(api + '/api/deployments/filter', json={}).json() if d['name'] == 'retrain')
        assert retrain['concurrency_options']['collision_strategy'] == 'CANCEL_NEW', 'two triggers at once: one retrain'
        ran = wait_for(lambda: [x for x in runs(env, 'daily-monitor') if x['state_type'] == 'COMPLETED'], 150)
        assert ran, runs(env, 'daily-monitor')[:3]
        assert 'next: ' in petpark('loop', 'status', env=env).stdout
        assert petpark('loop', 'stop', env=env).returncode == 0
        stopped = time.time(); time.sleep(max(0, 65 - (time.time() % 60)) + 5)  # a scheduled minute passes with the loop stopped
        assert petpark('loop', 'start', env=env).returncode == 0
        missed = lambda: [x for x in runs(env, 'daily-monitor') if x['state_type'] == 'COMPLETED' and stopped < _t(x['expected_start_time']) < stopped + 60]
        late = wait_for(missed, 150)
        assert late, [(x['expected_start_time'], x['state_name']) for x in runs(env, 'daily-monitor')[:6]]
        times = [x['expected_start_time'] for x in runs(env, 'daily-monitor')]
        assert len(times) == len(set(times)), 'no scheduled run twice'
        past = [x for x in runs(env, 'daily-monitor', before=_t(late[0]['expected_start_time']) + 1) if _t(x['expected_start_time']) >= _t(ran[0]['expected_start_time'])]
        minutes = [_t(x['expected_start_time']) for x in past]
        seen = [(x['expected_start_time'], x['state_name']) for x in past]
        assert minutes == [minutes[0] + 60*i for i in range(len(minutes))] and len(minutes) >= 2, f'every minute from the first run to the one missed while stopped has its run: {seen}'
        assert all(x['state_type'] == 'COMPLETED' for x in past), f'none lost: every minute that has passed ran: {seen}'
        audit = [json.loads(l) for l in (tmp_path/'registry/petpark-classifier/audit.jsonl').read_text().splitlines()]
        assert [a['words'] for a in audit if a['action'] == 'loop-decision'][0] == 'nothing alerted', 'each decision is audited in words'
    finally: petpark('loop', 'stop', env=env)


def _t(iso): return datetime.fromisoformat(iso.replace('Z', '+00:00')).timestamp()


def test_the_loop_runs_on_postgresql(tmp_path, pg_url):
    "Past one machine: Prefect's database on a PostgreSQL server (the one the tests start), the deployments served against it"
    env = loop_env(tmp_path, PETPARK_LOOP_DB_URL=pg_url.replace('postgresql://', 'postgresql+asyncpg://'))
    r = petpark('loop', 'start', env=env)
    try:
        assert r.returncode == 0, r.stderr + (tmp_path/'prefect/server.log').read_text()[-2000:]
        assert all(d in r.stdout for d in ('daily-monitor', 'watch-lake', 'retrain', 'weekly-summary')), r.stdout
        import psycopg
        with psycopg.connect(pg_url) as c: assert c.execute('SELECT COUNT(*) FROM deployment').fetchone()[0] == 4, 'Prefect keeps them in PostgreSQL'
    finally: petpark('loop', 'stop', env=env)


def test_a_second_retrain_is_refused_while_one_runs(tmp_path, monkeypatch):
    "While one retrain holds the site's lock (a file lock the kernel drops with its process), another, by a person or by the loop, stops at once and says so"
    from petpark.govern import retrain, retrain_lock
    from petpark.loop import retrain_flow
    from petpark.registry import Registry
    monkeypatch.setenv('PETPARK_REGISTRY_DIR', str(tmp_path/'registry'))
    reg = Registry()
    with retrain_lock(reg):
        with pytest.raises(Exception, match='another retrain runs'): retrain(tmp_path/'log.sqlite', registry=reg)
        assert 'another retrain runs' in retrain_flow.fn('a second trigger')['refused']
    with retrain_lock(reg): pass  # released
    assert [a['action'] for a in reg.audit_log()] == ['loop-retrain', 'loop-retrain-refused']


@pytest.fixture(scope='module')
def fortnight(tmp_path_factory):
    "A rehearsal site, and two weeks on it: an ordinary one, then one with night mode on day 3 and a dog-heavy day 5"
    from petpark.core import fast_clock
    from petpark.loop import at_site, local_midnight, sim_site, simulate_week
    d = tmp_path_factory.mktemp('fortnight')
    site = sim_site(d, per_class=250, camera_per_class=60)
    clock, start = d/'clock', local_midnight(time.time()) + 86400
    fast_clock(start, 0, clock)
    with at_site(site, clock) as srv:
        calm = simulate_week(srv.url, site['camera'], clock, start, script={}, per_day=60, feedback=0.35)
        week = simulate_week(srv.url, site['camera'], clock, start + 7*86400, per_day=60, feedback=0.35, first_morning=False)
        yield site, calm, week, clock


def test_a_rehearsed_fortnight_goes_as_the_park_expects(fortnight):
    from petpark.loop import rehearsal_words, week_summary
    from petpark.registry import Registry
    site, calm, week, _ = fortnight
    checks = rehearsal_words(calm, week)
    assert all(ok for _, ok in checks), [(w, ok) for w, ok in checks] + [(m['day'], m['alerts'], m['decision']) for m in calm['mornings'] + week['mornings']]
    at = {m['day']: m for m in week['mornings']}
    assert any(a.startswith('data drift') for a in at[4]['alerts']) and at[4]['version'] != site['prod']
    assert 'label shift' in at[6]['decision']
    reg = Registry(site['repo']/'registry', 'petpark-classifier')
    st = reg.state()
    assert st['stages']['prod'][-1] == site['prod'] and st['stages']['staging'][-1] == at[4]['version'], 'the candidate waits in staging for QA'
    assert reg.latest_challenge(at[4]['version'])['champion_version'] == site['prod'], 'it met the champion first'
    md = week_summary(reg.audit_log(), 0, 4e9)
    assert f"**QA**: {at[4]['version']}" in md and '**retrain**' in md


def test_a_retrain_killed_mid_way_leaves_the_registry_as_it_was(fortnight):
    "kill -9 during `dvc repro`: no new version, no stale lock (the loop's or DVC's), and the next retrain knows which batch to take up"
    from petpark.govern import retrain_lock, unfinished_batch
    from petpark.pipeline import release_dead_dvc_locks
    from petpark.registry import Registry
    site, _, _, clock = fortnight
    env = dict(site['env'], PETPARK_CLOCK=str(clock))
    reg = Registry(site['repo']/'registry', 'petpark-classifier')
    before = json.loads((site['repo']/'registry/petpark-classifier/registry.json').read_text())
    log = sqlite3.connect(site['repo']/'artifacts/serve/inference.sqlite')
    fresh = log.execute('SELECT request_id FROM predictions WHERE feedback IS NULL LIMIT 20').fetchall()
    log.executemany("UPDATE predictions SET feedback = label, feedback_time = 0 WHERE request_id = ?", fresh); log.commit(); log.close()  # staff labels to train on
    p = subprocess.Popen(['petpark', 'retrain'], cwd=site['repo'], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert wait_for(lambda: any(a['action'] == 'retrain-data' for a in reg.audit_log()[-5:]) and (site['repo']/'.dvc/tmp/rwlock').exists(), 300, 1), p.stdout.read() if p.poll() is not None else 'no repro'
    time.sleep(3)
    dvc = json.loads((site['repo']/'.dvc/tmp/rwlock').read_text())['write'].popitem()[1]['pid']
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert json.loads((site['repo']/'registry/petpark-classifier/registry.json').read_text()) == before
    assert not [x for x in reg.dir.iterdir() if x.is_dir() and x.name not in before['versions']], 'no half-registered version'
    with retrain_lock(reg): pass  # the killed retrain left no lock
    assert unfinished_batch(reg) == [a for a in reg.audit_log() if a['action'] == 'retrain-batch'][-1]['batch']
    assert release_dead_dvc_locks(site['repo']) == [dvc], 'the next retrain drops the killed repro\'s DVC locks before its own repro'
    st = subprocess.run(['dvc', 'status'], cwd=site['repo'], env=env, capture_output=True, text=True)
    assert st.returncode == 0, 'DVC is not left locked: ' + st.stderr[-1000:]
