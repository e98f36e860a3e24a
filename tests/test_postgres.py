"The inference log, the monitor and the server replicas on a real PostgreSQL server (started by conftest's `pg_server` on loopback)"
import os, time
from pathlib import Path
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
