"""Every statement the workers, the store callback and the status run on the outbox uses an
index: its cost does not grow with the number of rows (a million sent instances included).

The statements are those SQLite really runs (its trace callback, with the values bound) while
the outbox is used as the plugin uses it; each is explained on a large outbox.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from orthanc_kheops.state.outbox import Retry, SqliteOutbox

T0 = 1_700_000_000.0
ROWS = 50_000
MB = 1024 * 1024


def _large_outbox(path: Path) -> SqliteOutbox:
    outbox = SqliteOutbox(path)
    outbox.enqueue([(f"id{n:07}", 500_000) for n in range(ROWS)], now=T0, requeue=True)
    with sqlite3.connect(path) as db:  # most of them sent long ago, some failed
        db.execute(
            "UPDATE instances SET state = 'sent', done_at = ? WHERE orthanc_id < 'id0040000'", (T0,)
        )
        db.execute(
            "UPDATE instances SET state = 'failed', done_at = ?, last_error = '292'"
            " WHERE orthanc_id BETWEEN 'id0040000' AND 'id0041000'",
            (T0,),
        )
    return outbox


def _use_as_the_plugin_does(outbox: SqliteOutbox) -> None:
    now = T0 + 10
    outbox.enqueue([("new", 1000)], now=now, requeue=True)  # the store callback
    outbox.enqueue([("reconciled", 1000), ("other", 0)], now=now, requeue=False)
    outbox.enqueue([("new", 1000), ("again", 1000)], now=now, requeue=True)  # a backfill
    batch = outbox.claim(now=now, lease=300, max_count=50, max_bytes=32 * MB, linger=0.5)
    ids = [i.orthanc_id for i in batch]
    outbox.set_sop_uids({ids[0]: "1.2.3"})
    outbox.mark_sent(ids[:10], now=now)
    outbox.mark_failed({ids[10]: "262"}, now=now)
    outbox.reschedule([Retry(ids[11], 5.0, "503"), Retry(ids[12], 0.0, "400", alone=True)], now=now)
    outbox.release(ids[13:])
    outbox.claim(now=now, lease=300, max_count=1, max_bytes=0, due_by=float("inf"))  # a probe
    outbox.make_due(now=now)
    outbox.next_due()
    outbox.forget_deleted([ids[14], "id0040500"])
    outbox.prune_sent(before=now - 5, limit=1000)
    outbox.retry_failed(["id0040600"], now=now)
    outbox.retry_failed(None, now=now)
    outbox.recover_interrupted()
    outbox.counts()  # the status, the metrics
    outbox.get_meta("retries")
    outbox.set_meta("last_change", 12)
    for state in ("pending", "failed", "sent"):
        outbox.entries(state, limit=100, offset=200)
    outbox.lookup([f"id{n:07}" for n in range(0, ROWS, 97)])  # a study page


def test_no_statement_reads_the_whole_queue(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = _large_outbox(path)
    statements: list[str] = []
    for connection in (outbox._file._db, outbox._file._reader):
        connection.set_trace_callback(statements.append)
    try:
        _use_as_the_plugin_does(outbox)
    finally:
        outbox.close()

    explained = {
        sql
        for sql in statements
        if sql.split()[0].upper() in {"SELECT", "INSERT", "UPDATE", "DELETE"}
    }
    assert len(explained) >= 20
    db = sqlite3.connect(path)
    try:
        for sql in sorted(explained):
            bound = sql.replace("<= Inf", "<= 9e999")  # how the trace writes infinity
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {bound}")]
            whole = [s for s in plan if s.startswith("SCAN instances") or "TEMP B-TREE" in s]
            assert whole == [], f"{sql}\n  {plan}"
    finally:
        db.close()
