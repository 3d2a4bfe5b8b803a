"""`python -m bench.sink`: the benchmark's KHEOPS, a STOW-RS sink that favours no sender.

The KHEOPS test server (tests/kheops_server.py) is built for the contract and its faults: it
reads a whole request into memory before splitting it, so one chunked request of 2000 parts
cost it four times the CPU per instance of fifty requests of 50 parts. Here the body is read
in blocks of the same size whatever its framing (Content-Length or chunked, in chunks of any
size), split as it arrives, and each part costs the same: a read of its file meta group.
Its CPU per 1000 instances is reported for every contender, so that neutrality is checked in
each run rather than assumed.

It speaks the part of KHEOPS the plugin and Orthanc's DICOMweb client use (introspection, STOW-RS
with a dicom+json answer per instance) and the test server's control routes the bench reads
(/_test/counts, requests, the latency and down faults), for one album and its token.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom

BLOCK = 1 << 20  # bytes read from the socket at a time, and fed to the splitter at a time
LISTENING = "KHEOPS sink listening on "
_UNREADABLE = 0xC000


@dataclass
class Recorded:
    """One request; `started` and `ended` are this machine's monotonic clock, as the bench's."""

    method: str
    path: str
    status: int
    part_count: int
    started: float = 0.0
    ended: float = 0.0
    chunk_bytes: int = 0  # the mean size of a chunked body's chunks; 0 with a Content-Length


@dataclass
class SinkState:
    """What the sink holds: the album's instances, counts, faults and the requests log."""

    album: str
    token: str
    stores: int = 0
    instances: set[str] = field(default_factory=set)
    requests: list[Recorded] = field(default_factory=list)
    latency: float = 0.0
    down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    stored: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.stored = threading.Condition(self.lock)


def header_uids(part: bytes | memoryview) -> tuple[str, str] | None:
    """(SOP Class UID, SOP Instance UID) of a Part-10 file; None if it has neither.

    From the file meta group (a few struct reads: the sink must cost little, or it is the
    bottleneck that every contender meets and the ratios say nothing), and with pydicom,
    header only, for a file whose meta lacks them.
    """
    meta = _file_meta(part)
    if _SOP_CLASS in meta and _SOP_INSTANCE in meta:
        return meta[_SOP_CLASS], meta[_SOP_INSTANCE]
    try:
        dataset = pydicom.dcmread(BytesIO(bytes(part)), stop_before_pixels=True)
        sop_uid = str(dataset.SOPInstanceUID)
        sop_class = str(dataset.get("SOPClassUID") or dataset.file_meta.MediaStorageSOPClassUID)
    except Exception:  # noqa: BLE001 -- pydicom raises many types on garbage
        return None
    return (sop_class, sop_uid) if sop_uid and sop_class else None


_SOP_CLASS, _SOP_INSTANCE = 0x0002, 0x0003
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def _file_meta(part: bytes | memoryview) -> dict[int, str]:
    """The text elements of group 0002 (explicit VR little endian after the preamble)."""
    found: dict[int, str] = {}
    data = bytes(part[: min(len(part), 4096)])
    if data[128:132] != b"DICM":
        return found
    position = 132
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if vr in _LONG_VRS:
            if position + 12 > len(data):
                break
            (length,) = struct.unpack_from("<I", data, position + 8)
            position += 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            position += 8
        if vr == b"UI":
            found[element] = data[position : position + length].rstrip(b"\0 ").decode("latin-1")
        position += length
    return found


class PartSplitter:
    """Splits a multipart body fed block by block; calls `on_part` with each part's content.

    Each byte is appended to the buffer once and searched once; a part is handed on as a
    memoryview of the buffer (no copy) and dropped from it right after.
    """

    def __init__(self, boundary: bytes, on_part: Callable[[memoryview], None]) -> None:
        self._first = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray()
        self._on_part = on_part
        self._started = False  # the first delimiter has been seen
        self._scanned = 0  # where the next search for a delimiter begins
        self.parts = 0
        self.closed = False

    def feed(self, block: bytes | memoryview) -> None:
        if self.closed:
            return
        self._buffer += block
        self._split()

    def _split(self) -> None:
        buffer = self._buffer
        if not self._started:
            position = buffer.find(self._first)
            if position < 0:
                self._scanned = max(0, len(buffer) - len(self._first))
                return
            del buffer[: position + len(self._first)]
            self._started = True
            self._scanned = 0
        while True:
            # buffer starts right after a delimiter: "--" closes, else the part's header line.
            if len(buffer) < 2:
                return
            if buffer.startswith(b"--"):
                self.closed = True
                buffer.clear()
                return
            end = buffer.find(self._delimiter, self._scanned)
            if end < 0:
                self._scanned = max(0, len(buffer) - len(self._delimiter))
                return
            headers_end = buffer.find(b"\r\n\r\n", 0, end)
            with memoryview(buffer) as view:
                if headers_end >= 0:
                    self._on_part(view[headers_end + 4 : end])
                self.parts += 1
            del buffer[: end + len(self._delimiter)]
            self._scanned = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "KheopsBenchSink"
    disable_nagle_algorithm = True
    # Read from the socket a block at a time: with the default 8 KiB, a chunked body in chunks
    # of 64 KiB (the DICOMweb client's) cost a read from the socket per 8 KiB, a body with a
    # Content-Length far fewer.
    rbufsize = BLOCK
    timeout = 300

    def do_GET(self) -> None:
        state: SinkState = self.server.state  # type: ignore[attr-defined]
        self._started = time.monotonic()
        self._chunks = self._chunked_bytes = 0  # a connection's handler serves many requests
        url = urlsplit(self.path)
        if url.path.startswith("/_test/"):
            self._control(state, url.path[len("/_test/") :], url.query)
            return
        if state.latency:
            time.sleep(state.latency)
        if state.down:
            self._drain_body()
            self._answer(503, {"message": "the PACS behind KHEOPS is down"})
        elif self.command == "POST" and url.path == "/api/studies":
            self._stow(state)
            return
        elif self.command == "POST" and url.path == "/api/token/introspect":
            form = parse_qs(self._body().decode("latin-1"))
            active = form.get("token", [""])[0] == state.token
            self._answer(
                200,
                {"active": True, "scope": "read write", "album_id": state.album}
                if active
                else {"active": False},
            )
        else:
            self._drain_body()
            self._answer(404, {"message": f"no route {self.command} {url.path}"})
        with state.lock:
            state.requests.append(
                Recorded(self.command, url.path, self._status, 0, self._started, time.monotonic())
            )

    do_POST = do_PUT = do_DELETE = do_GET

    _status = 0
    _started = 0.0
    _chunks = 0
    _chunked_bytes = 0

    # --- bodies ------------------------------------------------------------------------------

    def _blocks(self) -> Any:
        """The request body in blocks of at most BLOCK bytes, whatever its framing.

        Both framings are read into one reused block, so a byte costs the same copies either
        way. A block is only valid until the next one is asked for.
        """
        block = memoryview(bytearray(BLOCK))
        filled = 0
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        length = 0 if chunked else int(self.headers.get("Content-Length") or 0)
        while size := self._next_chunk_size() if chunked else length:
            if chunked:
                self._chunks += 1
                self._chunked_bytes += size
            while size:
                count = self.rfile.readinto(block[filled : filled + min(size, BLOCK - filled)])
                if not count:
                    raise ConnectionResetError("the client closed the connection mid-body")
                size -= count
                filled += count
                if filled == BLOCK:
                    yield block
                    filled = 0
            if not chunked:
                break
            self.rfile.readline(1024)
        if chunked:
            while self.rfile.readline(65536).strip():
                pass  # trailer fields
        if filled:
            yield block[:filled]

    def _next_chunk_size(self) -> int:
        return int(self.rfile.readline(1024).split(b";")[0].strip(), 16)

    def _body(self) -> bytes:
        return b"".join(bytes(block) for block in self._blocks())

    def _drain_body(self) -> None:
        for _ in self._blocks():
            pass

    # --- STOW-RS -----------------------------------------------------------------------------

    def _stow(self, state: SinkState) -> None:
        authorized = self.headers.get("Authorization") == f"Bearer {state.token}"
        message = Message()
        message["Content-Type"] = self.headers.get("Content-Type") or ""
        boundary = message.get_param("boundary")
        if not authorized or not isinstance(boundary, str):
            self._drain_body()
            status = 401 if not authorized else 400
            self._answer(status, {"message": "token refused" if not authorized else "no boundary"})
            with state.lock:
                state.requests.append(
                    Recorded("POST", "/api/studies", status, 0, self._started, time.monotonic())
                )
            return
        stored: list[tuple[str, str]] = []
        unreadable = 0

        def on_part(content: memoryview) -> None:
            nonlocal unreadable
            uids = header_uids(content)
            if uids is None:
                unreadable += 1
            else:
                stored.append(uids)

        splitter = PartSplitter(boundary.encode("latin-1"), on_part)
        for block in self._blocks():
            splitter.feed(block)
        with state.lock:
            state.stores += len(stored)
            state.instances.update(uid for _, uid in stored)
            ended = time.monotonic()
            state.stored.notify_all()
        answer: dict[str, Any] = {}
        if stored:
            answer["00081199"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": [sop_class]},
                        "00081155": {"vr": "UI", "Value": [sop_uid]},
                    }
                    for sop_class, sop_uid in stored
                ],
            }
        if unreadable:
            answer["0008119A"] = {
                "vr": "SQ",
                "Value": [{"00081197": {"vr": "US", "Value": [_UNREADABLE]}}] * unreadable,
            }
        status = 200 if stored and not unreadable else 202 if stored else 409
        self._answer(status, answer, "application/dicom+json")
        with state.lock:
            state.requests.append(
                Recorded(
                    "POST",
                    "/api/studies",
                    status,
                    splitter.parts,
                    self._started,
                    ended,
                    self._chunked_bytes // max(self._chunks, 1),
                )
            )

    # --- control -----------------------------------------------------------------------------

    def _control(self, state: SinkState, route: str, query: str) -> None:
        body = self._body()
        document: Any = {}
        with state.lock:
            if route == "await":
                # Blocks until that many instances were stored: waiting costs no CPU, where
                # polling /counts would add the waiting time's polls to a contender's figures.
                wanted = int(parse_qs(query)["stores"][0])
                state.stored.wait_for(lambda: state.stores >= wanted, timeout=600)
                document = {"stores": state.stores}
            elif route == "health":
                document = {"ok": True}
            elif route == "counts":
                document = {"stores": state.stores, "instances": len(state.instances)}
            elif route == f"albums/{state.album}/instances":
                document = {"instances": sorted(state.instances)}
            elif route == "requests" and self.command == "DELETE":
                state.requests.clear()
            elif route == "requests":
                document = {
                    "requests": [
                        {
                            "method": r.method,
                            "path": r.path,
                            "status": r.status,
                            "part_count": r.part_count,
                            "started": r.started,
                            "ended": r.ended,
                            "chunk_bytes": r.chunk_bytes,
                        }
                        for r in state.requests
                    ]
                }
            elif route == "faults/latency":
                state.latency = float(json.loads(body)["seconds"])
            elif route == "faults/down":
                state.down = bool(json.loads(body)["down"])
            else:
                document = None
        if document is None:
            self._answer(404, {"message": f"no control route {route}"})
        else:
            self._answer(200, document)

    def _answer(self, status: int, document: Any, content_type: str = "application/json") -> None:
        body = json.dumps(document).encode()
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--album", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument(
        "--tls",
        nargs=2,
        metavar=("CERTIFICATE", "KEY"),
        help="serve HTTPS with this certificate and key (PEM files)",
    )
    args = parser.parse_args(argv)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    server = _Server(("127.0.0.1", args.port), _Handler)
    server.state = SinkState(album=args.album, token=args.token)  # type: ignore[attr-defined]
    scheme = "http"
    if args.tls:
        # As a real KHEOPS is reached: the contenders encrypt, and the sink's CPU per instance
        # includes decrypting, the same per byte whatever the framing.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*args.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"{LISTENING}{scheme}://127.0.0.1:{server.server_address[1]}", flush=True)
    signal.sigwait(stop)
    server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
