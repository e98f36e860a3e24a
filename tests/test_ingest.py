"Ingest on real lake photos and hand-made dirty files: accounting, split stability, leakage, cache, parallelism"
import os
from pathlib import Path
import pandas as pd
from PIL import Image
from petpark.core import load_params, override
from petpark.ingest import ingest_lake
from conftest import TEST_LAKE, make_lake, tree_digest


def run(lake, out, cache, **kw):
    m = ingest_lake(lake, out, override(load_params().ingest, kw), cache_dir=cache)
    return m, pd.read_csv(Path(out)/'manifest.csv')


def test_every_file_accounted_once_and_lake_untouched(tmp_path):
    lake = make_lake(tmp_path/'lake', 40)
    before = tree_digest(lake)
    m, man = run(lake, tmp_path/'out', tmp_path/'cache')
    assert tree_digest(lake) == before
    files = sorted(Path(d, f).relative_to(lake).as_posix() for d, _, fs in os.walk(lake) for f in fs)
    assert sorted(man.path) == files and m['files'] == len(files)
    assert set(man.status) == {'train', 'test', 'duplicate', 'quarantine'}
    assert man[man.status == 'quarantine'].reason.notna().all()
    assert man[man.status.isin(['train', 'test'])].reason.isna().all()
    reasons = man.set_index('path').reason
    expected = {'Cat/.DS_Store': 'os_litter', 'Cat/._1.jpg': 'os_litter', 'Dog/Thumbs.db': 'os_litter',
                'Cat/666.jpg': 'empty', 'Cat/notes.jpg': 'not_image', 'Dog/11702.jpg': 'truncated',
                'Dog/tiny_1.jpg': 'too_small', 'Cat/bomb.png': 'decompression_bomb',
                'Cat/anim.gif': 'unsupported_format', 'Cat/0.jpg': 'label_conflict',
                'Dog/dup_of_cat.jpg': 'label_conflict', 'Dog/cmyk_1.jpg': 'near_dup_label_conflict'}
    assert {p: reasons[p] for p in expected} == expected


def test_split_is_stratified_and_stable_as_lake_grows(tmp_path):
    lake = make_lake(tmp_path/'lake', 150)
    _, man1 = run(lake, tmp_path/'out', tmp_path/'cache', test_frac=0.2)
    kept1 = man1[man1.status.isin(['train', 'test'])].set_index('path')
    for label, share in (kept1.split == 'test').groupby(kept1.label).mean().items():
        assert abs(share - 0.2) < 1 / len(kept1), (label, share)
    # grow: 120 new photos per class, and a re-encoded, resized copy of 10 existing photos
    make_lake(lake, 120, start=150, dirty=False)
    olds = kept1.index[:10]
    for p in olds:
        im = Image.open(lake/p).convert('RGB')
        im.resize((150, 150)).save(lake/p.replace('.jpg', '_copy.jpg'), quality=80)
    _, man2 = run(lake, tmp_path/'out', tmp_path/'cache', test_frac=0.2)
    man2 = man2.set_index('path')
    assert (man2.loc[kept1.index, 'split'] == kept1.split).all(), 'an existing photo moved between splits'
    for p in olds:
        assert man2.loc[p.replace('.jpg', '_copy.jpg'), 'split'] == man2.loc[p, 'split'], p
        assert man2.loc[p, 'near_dup_group'] == man2.loc[p.replace('.jpg', '_copy.jpg'), 'near_dup_group']
    kept2 = man2[man2.status.isin(['train', 'test'])]
    for label, share in (kept2.split == 'test').groupby(kept2.label).mean().items():
        assert abs(share - 0.2) < 0.02, (label, share)


def test_new_salt_draws_a_new_split_on_purpose(tmp_path):
    lake = make_lake(tmp_path/'lake', 100, dirty=False)
    _, a = run(lake, tmp_path/'out', tmp_path/'cache', split_salt='v1')
    _, b = run(lake, tmp_path/'out', tmp_path/'cache', split_salt='v2')
    _, c = run(lake, tmp_path/'out2', tmp_path/'cache', split_salt='v1')
    assert (a.split != b.split).any()
    assert (a.split == c.split).all(), 'the same salt must give the same split on a fresh run'


def test_cache_and_workers_do_not_change_the_manifest(tmp_path):
    lake = make_lake(tmp_path/'lake', 60)
    m1, a = run(lake, tmp_path/'o1', tmp_path/'cache', workers=1)
    m2, b = run(lake, tmp_path/'o2', tmp_path/'cache', workers=2)
    assert m1['cached'] == 0
    assert m2['cached'] == m2['files'] - m2['reason']['os_litter']
    pd.testing.assert_frame_equal(a, b)


def test_missing_snapshot_is_a_clear_error(tmp_path):
    import pytest
    from petpark.core import PetparkError
    with pytest.raises(PetparkError, match='petpark data'):
        ingest_lake(tmp_path/'nothing', tmp_path/'out', load_params().ingest, cache_dir=tmp_path/'cache')


def test_dask_cluster_writes_the_process_pool_manifest(tmp_path, monkeypatch):
    "ingest_engine = dask with no scheduler: a LocalCluster of 2 worker processes, started for the run and closed after"
    import psutil
    m1, _ = run(TEST_LAKE, tmp_path/'pool', tmp_path/'c1', workers=2)
    monkeypatch.setenv('PETPARK_INGEST_ENGINE', 'dask')
    monkeypatch.setenv('PETPARK_DASK_SCHEDULER', '')
    m2, _ = run(TEST_LAKE, tmp_path/'dask', tmp_path/'c2', workers=2)
    for f in ['manifest.csv', 'splits.csv']:
        assert (tmp_path/'pool'/f).read_bytes() == (tmp_path/'dask'/f).read_bytes(), f
    same = lambda m: {k: v for k, v in m.items() if k not in ('engine', 'seconds', 'images_per_s')}
    assert same(m1) == same(m2) and m1['cached'] == m2['cached'] == 0
    assert (m1['engine'], m2['engine']) == ('pool', 'dask')
    workers = [p for p in psutil.Process().children(recursive=True) if 'resource_tracker' not in ' '.join(p.cmdline())]
    assert workers == [], 'the LocalCluster left processes behind'


def test_dask_scheduler_from_settings(tmp_path, monkeypatch):
    "dask_scheduler names a running cluster (here one this test starts on loopback): ingest uses it and leaves it running"
    from distributed import Client, LocalCluster
    _, a = run(TEST_LAKE, tmp_path/'pool', tmp_path/'c1', workers=1)
    monkeypatch.setenv('PETPARK_INGEST_ENGINE', 'dask')
    with LocalCluster(n_workers=2, processes=False, protocol='tcp://', host='127.0.0.1', dashboard_address=None) as cluster:
        monkeypatch.setenv('PETPARK_DASK_SCHEDULER', cluster.scheduler_address)
        m, b = run(TEST_LAKE, tmp_path/'dask', tmp_path/'c2')
        with Client(cluster) as c: assert len(c.nthreads()) == 2, 'the cluster named by the setting must outlive the run'
    pd.testing.assert_frame_equal(a, b)
    assert m['engine'] == 'dask'


def test_dask_settings_errors_are_clear(tmp_path, monkeypatch):
    import pytest, socket
    from petpark.core import PetparkError
    monkeypatch.setenv('PETPARK_INGEST_ENGINE', 'spark')
    with pytest.raises(PetparkError, match="ingest_engine = 'spark'"): run(TEST_LAKE, tmp_path/'o1', tmp_path/'c')
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]  # a free port: nobody listens
    monkeypatch.setenv('PETPARK_INGEST_ENGINE', 'dask')
    monkeypatch.setenv('PETPARK_DASK_SCHEDULER', f'tcp://127.0.0.1:{port}')
    with pytest.raises(PetparkError, match='no Dask scheduler answered.*dask_scheduler'): run(TEST_LAKE, tmp_path/'o2', tmp_path/'c')
