"""`make demo`: Orthanc with the plugin, feeding a local KHEOPS sandbox, with one switching rule.

The sandbox is the KHEOPS test server the integration tests use. It holds two albums: the main
album, which receives everything, and a research album, into which a switching rule shares the
series of the studies described "RESEARCH PROTOCOL R42". A few generated studies are sent to
Orthanc with storescu; the demo prints where to watch them arrive, starting with the KHEOPS web
app, then keeps running until Ctrl-C or SIGTERM (or exits at once with --no-wait).

Orthanc answers this machine only: RemoteAccessAllowed is false (so its HTTP API needs no
password here), and DICOM stores are taken from storescu on loopback only.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

from tests.corpus import generate_corpus, plan_corpus
from tests.kheops_server import KheopsTestServer
from tests.orthanc_process import OrthancError, OrthancProcess, free_ports
from tests.waiting import wait_until

STATE = Path(__file__).resolve().parent.parent / "demo-state"
MAIN_ALBUM = "MainAlbum01"
RESEARCH_ALBUM = "ResearchR42"
# Sandbox-only tokens: they open nothing outside this demo.
MAIN_TOKEN = "DemoMainAlbumToken0001"
RESEARCH_TOKEN = "DemoResearchToken00042"
RESEARCH_DESCRIPTION = "RESEARCH PROTOCOL R42"
RESEARCH_CONDITION = f"tagValueIsPresent(#Tag.StudyDescription, '{RESEARCH_DESCRIPTION}')"
CALLING_AET = "STORESCU"
# This machine only: HTTP from loopback, C-STORE from the one modality the demo declares.
LOCAL_ONLY = {
    "RemoteAccessAllowed": False,
    "DicomAlwaysAllowStore": False,
    "DicomAlwaysAllowEcho": False,
    "DicomCheckModalityHost": True,
    "DicomModalities": {"demo": [CALLING_AET, "127.0.0.1", 104]},
}


class _Stop(Exception):
    """SIGTERM, turned into an exception so that the demo stops the way Ctrl-C stops it."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--no-wait", action="store_true", help="exit once the studies arrived")
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--state", type=Path, default=STATE, help="work folder, emptied first")
    args = parser.parse_args(argv)
    state: Path = args.state
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # Ctrl-C stops the demo even when its shell started it with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run(args, state)
    except (KeyboardInterrupt, _Stop):
        print("\nDemo stopped.")
        return 0


def _run(args: argparse.Namespace, state: Path) -> int:

    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    sandbox = KheopsTestServer(port=_preferred_port(8099))
    sandbox.start()
    sandbox.add_album(MAIN_ALBUM)
    sandbox.add_album(RESEARCH_ALBUM)
    sandbox.add_token(album_id=MAIN_ALBUM, token=MAIN_TOKEN, scope=("read", "write", "send"))
    sandbox.add_token(album_id=RESEARCH_ALBUM, token=RESEARCH_TOKEN, scope=("read", "write"))

    orthanc = OrthancProcess(
        state / "orthanc",
        kheops={
            "Url": sandbox.url,
            "Token": MAIN_TOKEN,
            "SwitchingAlbums": [
                {
                    "Name": "research-r42",
                    "DestinationToken": RESEARCH_TOKEN,
                    "Condition": RESEARCH_CONDITION,
                }
            ],
        },
        extra_config=LOCAL_ONLY,
        verbose=False,
    )
    (state / "orthanc").mkdir()
    try:
        orthanc.start()
        plan = plan_corpus(
            state / "corpus", studies=args.studies, series_per_study=2, instances_per_series=5
        )
        generate_corpus(
            state / "corpus", studies=args.studies, series_per_study=2, instances_per_series=5
        )
        print(f"Sending {len(plan)} instances of {args.studies} studies to Orthanc by C-STORE...")
        orthanc.storescu([item.path for item in plan], calling_aet=CALLING_AET)
        wait_until(
            lambda: len(sandbox.album_instances(MAIN_ALBUM)) == len(plan),
            timeout=120,
            message="every instance in the main album",
        )
        research = {
            (i.study_uid, i.series_uid)
            for i in plan
            if i.attributes["study_description"] == RESEARCH_DESCRIPTION
        }
        wait_until(
            lambda: sandbox.album_series(RESEARCH_ALBUM) == research,
            timeout=60,
            message="the research series shared into the research album",
        )
        _report(orthanc, sandbox, len(plan), len(research))
        if not args.no_wait:
            _wait_for_interrupt()
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        previous = (
            signal.signal(signal.SIGINT, signal.SIG_IGN),
            signal.signal(signal.SIGTERM, signal.SIG_IGN),
        )
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt | _Stop)
        try:
            try:
                orthanc.stop()
            except OrthancError:
                # A terminal signals the whole process group: Orthanc got it too, and went.
                if not interrupted:
                    raise
            sandbox.stop()
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])
    return 0


def _report(orthanc: OrthancProcess, sandbox: KheopsTestServer, sent: int, shared: int) -> None:
    print(
        f"""
All {sent} instances are in the main album; {shared} series matched the rule and were shared.

  KHEOPS web app        {orthanc.url}/kheops/app/
  Orthanc Explorer      {orthanc.url}/app/explorer.html
  Forwarding status     {orthanc.url}/kheops/status
  Queue (sent)          {orthanc.url}/kheops/queue?state=sent
  Switching rules       {orthanc.url}/kheops/rules
  Main album (sandbox)  {sandbox.url}/_test/albums/{MAIN_ALBUM}/series
  Research album        {sandbox.url}/_test/albums/{RESEARCH_ALBUM}/series
  Orthanc DICOM port    {orthanc.dicom_port} (AET {orthanc.aet}): storescu -aet {CALLING_AET} more there

Orthanc answers this machine only (RemoteAccessAllowed is false), without a password.
Orthanc's log: {orthanc.log_path}
"""
    )


def _wait_for_interrupt() -> None:
    print("Press Ctrl-C to stop the demo.", flush=True)
    threading.Event().wait()  # until Ctrl-C or SIGTERM raises


def _preferred_port(port: int) -> int:
    """The sandbox's usual port when it is free, so that its URLs stay the same."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return free_ports(1)[0]
    return port


if __name__ == "__main__":
    sys.exit(main())
