"""`python -m bench.outbox_scale`: what the outbox costs at a million instances, before and after.

Not a test: it prints a Markdown table. Each outbox is filled directly with SQL (a million rows
of which 900 000 sent, 99 000 waiting and 1000 waiting for a retry), then timed doing what the
plugin does: the store callback's enqueue, a worker's claim and verdict, the status's counts,
and "KHEOPS is back" (make_due) while the store callback keeps queuing, whose worst wait is
what Orthanc's lock would hold. "before" is the outbox of another commit (`--before`, read with
`git show`), "after" the one in this working tree.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0
MB = 1024 * 1024


def _module_at(commit: str, folder: Path) -> ModuleType:
    """The outbox module of `commit`, with the state_file module it imports."""
    package = folder / "outbox_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("outbox", "state_file", "errors"):
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}:plugin/orthanc_kheops/state/{name}.py"],
            capture_output=True,
            text=True,
            check=False,  # a module the old commit lacks is left out
        )
        if source.returncode == 0:
            (package / f"{name}.py").write_text(source.stdout)
    sys.path.insert(0, str(folder))
    return importlib.import_module("outbox_before.outbox")


def _fill(outbox: Any, path: Path, rows: int) -> None:
    """`rows` instances: 90 % sent, 1000 waiting for a retry, the rest due."""
    outbox.enqueue([("seed", 1)], now=T0, requeue=True)
    import sqlite3

    db = sqlite3.connect(path)
    sent = rows * 9 // 10
    with db:
        db.execute("DELETE FROM instances")
        db.executemany(
            "INSERT INTO instances (orthanc_id, state, size, queued_at, next_attempt, done_at)"
            " VALUES (?, ?, 524288, ?, ?, ?)",
            (
                (
                    f"{n:08x}-0000-0000-0000-000000000000",
                    "sent" if n < sent else "pending",
                    T0 + n / 1000,
                    T0 + 10_000 + (n % 1000 if rows - n <= 1000 else 0),
                    T0 + n / 1000 if n < sent else None,
                )
                for n in range(rows)
            ),
        )
        if _has_tally(db):  # the tally the triggers keep, set once for rows added behind them
            db.execute(
                "UPDATE tally SET n = (SELECT COUNT(*) FROM instances WHERE state = tally.name)"
                " WHERE name IN ('pending', 'inflight', 'sent', 'failed')"
            )
    db.close()


def _has_tally(db: Any) -> bool:
    return bool(db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tally'").fetchone())


def _claim(outbox: Any, now: float) -> list[Any]:
    kwargs: dict[str, Any] = {"now": now, "max_count": 50, "max_bytes": 32 * MB, "linger": 0.5}
    try:
        return list(outbox.claim(lease=300.0, **kwargs))
    except TypeError:  # the outbox before leases
        return list(outbox.claim(**kwargs))


def _median_ms(action: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def _while_storing(enqueue: Callable[[], None], work: Callable[[], object]) -> tuple[float, float]:
    """How long `work` takes, and the longest an enqueue waited meanwhile, in seconds."""
    waits: list[float] = [0.0]
    done = threading.Event()

    def keep_storing() -> None:
        while not done.is_set():
            started = time.perf_counter()
            enqueue()
            waits.append(time.perf_counter() - started)

    storer = threading.Thread(target=keep_storing)
    storer.start()
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    done.set()
    storer.join()
    return seconds, max(waits)


def measure(factory: Callable[[Path], Any], rows: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "outbox.sqlite3"
        outbox = factory(path)
        _fill(outbox, path, rows)
        now = T0 + 20_000
        counter = iter(range(10**9))

        def enqueue() -> None:
            outbox.enqueue([(f"new-{next(counter)}", 524288)], now=now, requeue=True)

        def claim_and_send() -> None:
            batch = _claim(outbox, now)
            outbox.mark_sent([i.orthanc_id for i in batch], now=now)

        results = {
            "enqueue (store callback), ms": _median_ms(enqueue, 2000),
            "claim 50 + mark sent, ms": _median_ms(claim_and_send, 200),
            "counts (status, metrics), ms": _median_ms(outbox.counts, 20),
        }
        import sqlite3

        db = sqlite3.connect(path)
        with db:  # every waiting instance in its backoff, as after an outage
            db.execute(
                "UPDATE instances SET next_attempt = ? WHERE state = 'pending'", (now + 300,)
            )
        db.close()
        seconds, wait = _while_storing(enqueue, lambda: outbox.make_due(now=now))
        results["make_due, whole queue, s"] = seconds
        results["longest enqueue wait meanwhile, ms"] = wait * 1000
        if hasattr(outbox, "prune_sent"):

            def prune() -> None:
                while outbox.prune_sent(before=now, limit=1000) == 1000:
                    time.sleep(0)  # as the forwarder's pruning does between steps

            seconds, wait = _while_storing(enqueue, prune)
            results["prune every sent row (after only), s"] = seconds
            results["longest enqueue wait meanwhile (prune), ms"] = wait * 1000
        outbox.close()
        results["file, MB"] = sum(p.stat().st_size for p in Path(folder).glob("outbox*")) / MB
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--before", default="392ec51", help="commit of the outbox to compare")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "plugin"))
    after = importlib.import_module("orthanc_kheops.state.outbox")
    with tempfile.TemporaryDirectory() as folder:
        before = _module_at(args.before, Path(folder))
        print(f"measuring {args.rows} rows, before ({args.before})...", file=sys.stderr)
        old = measure(before.SqliteOutbox, args.rows)
        print("measuring after...", file=sys.stderr)
        new = measure(after.SqliteOutbox, args.rows)
    print(f"| {args.rows:,} instances in the outbox | before ({args.before}) | after |")
    print("|---|---:|---:|")
    for key in new:
        before_value = f"{old[key]:.3f}" if key in old else "-"
        print(f"| {key} | {before_value} | {new[key]:.3f} |")


if __name__ == "__main__":
    main()
