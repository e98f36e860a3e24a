"The `petpark` command: help, and one clear line (no traceback) for a problem the user can fix"
from conftest import petpark, venv_env


def test_missing_lake_is_one_clear_line(env, tmp_path):
    env['PETPARK_LAKE'] = str(tmp_path/'no-lake')
    r = petpark('data', env=env)
    assert r.returncode == 2
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert 'no-lake' in r.stderr and 'PETPARK_LAKE' in r.stderr and 'settings.ini' in r.stderr


def test_lake_that_is_a_file_is_one_clear_line(env, tmp_path):
    (tmp_path/'lake.zip').write_bytes(b'PK')
    env['PETPARK_LAKE'] = str(tmp_path/'lake.zip')
    r = petpark('data', env=env)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'PETPARK_LAKE' in r.stderr


def test_usage_and_help(env):
    r = petpark(env=env)
    assert r.returncode == 2 and 'ingest' in r.stderr and 'bench' in r.stderr
    r = petpark('ingest', '--help', env=env)
    assert r.returncode == 0 and '--no-dvc' in r.stdout and 'dvc repro ingest' in r.stdout


def test_unknown_benchmark(env):
    r = petpark('bench', 'nothing', env=env)
    assert r.returncode == 2 and 'choose ingest' in r.stderr


def test_bench_scale_with_bad_workers_is_one_clear_line(env):
    for bad, words in [('2', 'from 1 (the baseline)'), ('1,two', 'separated by commas'), ('1,999', "this machine's cores")]:
        r = petpark('bench', 'scale', '--workers', bad, env=env)
        assert r.returncode == 2 and 'Traceback' not in r.stderr and words in r.stderr, r.stderr


def test_evaluate_with_bad_sizes_is_one_clear_line(env):
    for bad in ['big', '260,x', '8']:
        r = petpark('evaluate', '--sizes', bad, env=env)
        assert r.returncode == 2 and 'Traceback' not in r.stderr and 'e.g. 260,288,320' in r.stderr, r.stderr


def test_an_edited_audit_record_is_found_and_blocks_promotion(tmp_path):
    "The registry's audit log is a hash chain: `petpark audit verify` names an edited record, and promotion waits for a restored log"
    from petpark.registry import Registry
    reg = Registry(tmp_path/'registry', 'petpark-classifier')
    for name in ('a', 'b'):
        (tmp_path/f'{name}.onnx').write_bytes(name.encode())
        reg.register([tmp_path/f'{name}.onnx'], dict(gate={'passed': True, 'reasons': []}), by='ds-dana')
    env = venv_env(PETPARK_REGISTRY_DIR=str(tmp_path/'registry'), PETPARK_USER='ops-olga')
    r = petpark('audit', 'verify', env=env)
    assert r.returncode == 0 and '2 records chained and whole' in r.stdout, r.stdout + r.stderr
    good = reg.audit_path.read_text()
    reg.audit_path.write_text(good.replace('"ds-dana"', '"qa-quinn"', 1))  # someone rewrites who registered v1
    r = petpark('audit', 'verify', env=env)
    assert r.returncode == 2 and 'record 1 was edited: record 2 was chained to other contents' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = petpark('registry', 'promote', 'v2', 'staging', env=env)
    assert r.returncode == 2 and 'the audit log is broken (record 1 was edited' in r.stderr, r.stderr
    reg.audit_path.write_text(good); (reg.dir/'audit.head.json').unlink()  # restored from the backup
    assert petpark('registry', 'promote', 'v2', 'staging', env=env).returncode == 0
    assert petpark('audit', 'verify', env=env).returncode == 0
