"""`python -m bench.sdk_threads`: when do in-process SDK calls from Python deadlock Orthanc?

Each variant starts a plain Orthanc whose Python plugin (bench/sdk_threads_plugin.py) calls
the SDK in one way (from its own threads, or from inside a callback) while this driver stores
instances over REST and C-STORE at the same time. A variant deadlocks when stores stop
answering; the stacks of Orthanc's threads (gdb) then say who holds what.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import requests

from bench import corpus as corpora
from tests.orthanc_process import PYTHON_PLUGIN, OrthancProcess

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / "build" / "sdk-threads"
PLUGIN = Path(__file__).resolve().parent / "sdk_threads_plugin.py"
VARIANTS = (
    "none",
    "thread-get-file",
    "thread-get-changes",
    "thread-dicom-for-instance",
    "thread-put-metadata",
    "thread-modify",
    "thread-store",
    "thread-delete",
    "get-in-store-callback",
    "file-in-store-callback",
    "get-in-change-callback",
)
_STALL = 20.0  # seconds without an answer to a store: a deadlock, not a slow machine


def run_variant(variant: str, files: Sequence[Path], python_plugin: Path) -> tuple[str, str]:
    """(verdict, detail) of one variant on a fresh Orthanc."""
    workdir = WORKDIR / variant
    shutil.rmtree(workdir, ignore_errors=True)
    orthanc = OrthancProcess(
        workdir,
        verbose=False,
        extra_config={"Plugins": [str(python_plugin)], "PythonScript": str(PLUGIN)},
        env={"SDK_THREADS_VARIANT": variant},
    )
    orthanc.start()
    half = len(files) // 2
    began = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=6)
    try:
        uploads = [pool.submit(_upload, orthanc, list(files[i:half:4])) for i in range(4)]
        dimse = pool.submit(orthanc.storescu, list(files[half:]), timeout=_STALL * 3)
        polls = pool.submit(_poll, orthanc, [*uploads, dimse])
        for future in uploads:
            future.result()
        dimse.result()
        polls.result()
        counts = orthanc.get("/sdk-threads/counts", timeout=_STALL).json()
    except (requests.Timeout, subprocess.TimeoutExpired, TimeoutError) as exc:
        stalled = time.monotonic() - began
        stacks = _stacks(orthanc.pid, workdir)
        orthanc.kill()
        return "DEADLOCK", f"{type(exc).__name__} after {stalled:.0f} s; {stacks}"
    except Exception as exc:  # noqa: BLE001 -- a failed variant is a finding, not a crash
        orthanc.kill()
        return "error", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        orthanc.kill()  # a deadlocked Orthanc would hold the clients until their timeouts
        pool.shutdown(wait=True)
    seconds = time.monotonic() - began
    shutil.rmtree(workdir, ignore_errors=True)
    return "ok", (
        f"{counts['stored']} stored, {counts['calls']} SDK calls returned,"
        f" {counts['errors']} raised, in {seconds:.1f} s"
    )


def _poll(orthanc: OrthancProcess, stores: Sequence[Future[None]]) -> None:
    """Call the plugin's REST route all along: Orthanc's HTTP threads take the GIL too."""
    while not all(future.done() for future in stores):
        orthanc.get("/sdk-threads/counts", timeout=_STALL).raise_for_status()
        time.sleep(0.02)


def _upload(orthanc: OrthancProcess, files: Sequence[Path]) -> None:
    for path in files:
        response = orthanc.post(
            "/instances",
            data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
            timeout=_STALL,
        )
        response.raise_for_status()


def _stacks(pid: int, workdir: Path) -> str:
    """Where Orthanc's threads wait, summarised; the whole dump goes next to the log."""
    try:
        dump = subprocess.run(
            ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 40"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "no stacks (gdb failed)"
    (workdir / "stacks.txt").write_text(dump)
    kinds: dict[str, int] = {}
    for thread in re.split(r"\n(?=Thread \d+ )", dump)[1:]:
        frames = re.findall(r"#\d+ +(?:0x[0-9a-f]+ in )?(\S+)", thread)
        python = any(f.startswith("_PyEval_EvalFrame") for f in frames)
        locked = any(f in ("__GI___lll_lock_wait", "___pthread_mutex_lock") for f in frames)
        if "PyGILState_Ensure" in frames:
            kind = "a callback from Orthanc waits for the GIL"
        elif python and locked:
            kind = "a Python thread holds the GIL and waits for a lock inside an SDK call"
        elif locked:
            kind = "an Orthanc thread (HTTP, DICOM) waits for a lock"
        else:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = "; ".join(f"{count} x {kind}" for kind, count in sorted(kinds.items()))
    return f"{summary} (stacks in {workdir.relative_to(ROOT) / 'stacks.txt'})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sdk_threads", description=__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--python-plugin", type=Path, default=PYTHON_PLUGIN)
    args = parser.parse_args(argv)
    files = corpora.ensure(args.instances, size=64).paths
    print("| Variant | Verdict | Detail |\n|---|---|---|")
    for variant in args.variants.split(","):
        verdict, detail = run_variant(variant, files, args.python_plugin)
        print(f"| {variant} | {verdict} | {detail} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
