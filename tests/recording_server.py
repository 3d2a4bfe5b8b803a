"""A tiny local HTTP server that answers with scripted answers and records each request.

For the unit tests of the plugin's HTTP clients (KHEOPS, Orthanc's loopback REST).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes
    client_port: int  # tells one connection from another


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    drop: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # more response headers (Location, Retry-After)


class RecordingServer:
    """Answers each request with the next scripted Answer and records it.

    An unscripted request gets 599 and is noted in `unexpected`, checked after each test.
    """

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self.unexpected: list[str] = []
        self._answers: deque[Answer] = deque()
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                recorder._serve(self)

            do_PUT = do_GET = do_POST

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._scheme = "https" if tls is not None else "http"
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}"

    def answer(self, *answers: Answer) -> None:
        with self._lock:
            self._answers.extend(answers)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", 0))
        body = handler.rfile.read(length)
        with self._lock:
            self.received.append(
                Received(
                    method=handler.command,
                    path=handler.path,
                    version=handler.request_version,
                    headers={k.lower(): v for k, v in handler.headers.items()},
                    body=body,
                    client_port=handler.client_address[1],
                )
            )
            answer = self._answers.popleft() if self._answers else None
            if answer is None:
                self.unexpected.append(f"{handler.command} {handler.path}")
        if answer is None:
            answer = Answer(599, b"no answer scripted", "text/plain")
        if answer.drop:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.send_response(answer.status)
        handler.send_header("Content-Type", answer.content_type)
        for name, value in answer.headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(answer.body)))
        handler.end_headers()
        handler.wfile.write(answer.body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
