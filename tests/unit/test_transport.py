"""A body's buffers handed to the socket together: every byte, in order, in few system calls."""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orthanc_kheops.kheops.client import KheopsClient, make_session
from orthanc_kheops.kheops.transport import TLS_WRITE, _joined, send_buffers
from orthanc_kheops.observability.masking import Secret
from tests.recording_server import Answer, RecordingServer

TOKEN = Secret("KbSVRVsa0rTCh6D5l9JnAb")
CERTIFICATE = Path(__file__).parent / "data" / "localhost-tls.crt"
KEY = Path(__file__).parent / "data" / "localhost-tls.key"
ANSWER = Answer(200, json.dumps({"00081190": {"vr": "UR", "Value": ["x"]}}).encode())
PARTS = [bytes([index]) * 70_000 for index in range(100)]  # a batch of 64 KiB instances


def _received_through_a_small_buffer(buffers: list[bytes]) -> bytes:
    """What the other end of a socket pair reads while `send_buffers` sends into a send buffer
    smaller than the body, so that each sendmsg takes only part of what it is given."""
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender.settimeout(10)  # as urllib3's sockets: partial sends, not one blocking call
    received = bytearray()

    def read() -> None:
        while chunk := receiver.recv(1500):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        send_buffers(sender, buffers)
    finally:
        sender.close()
        reader.join(10)
        receiver.close()
    return bytes(received)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=20_000), max_size=30))
def test_every_byte_arrives_in_order_though_the_socket_takes_part_at_a_time(
    buffers: list[bytes],
) -> None:
    assert _received_through_a_small_buffer(buffers) == b"".join(buffers)


def test_more_buffers_than_one_sendmsg_takes_all_arrive() -> None:
    buffers = [bytes([index % 251]) * 3 for index in range(2500)]

    assert _received_through_a_small_buffer(buffers) == b"".join(buffers)


def _client(url: str, verify: bool | str = True) -> KheopsClient:
    return KheopsClient(
        url,
        session=make_session(url=url, pool_size=1, verify=verify),
        connect_timeout=5.0,
        read_timeout=10.0,
    )


def _calls(monkeypatch: pytest.MonkeyPatch, cls: type, *names: str) -> dict[str, int]:
    """How often each method of `cls` is called: the real method runs."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        method = getattr(cls, name)

        def counted(self: Any, *args: Any, _name: str = name, _method: Any = method) -> Any:
            counts[_name] += 1
            return _method(self, *args)

        monkeypatch.setattr(cls, name, counted)
    return counts


def _body_of(server: RecordingServer) -> bytes:
    (request,) = server.received
    assert request.headers["content-length"] == str(len(request.body))
    return request.body


def test_a_batch_reaches_a_plain_socket_in_a_few_sendmsg_calls_not_two_sends_per_instance(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.answer(ANSWER)
    calls = _calls(monkeypatch, socket.socket, "sendmsg", "sendall")

    _client(server.url).stow(TOKEN, PARTS)

    body = _body_of(server)
    assert all(part in body for part in PARTS)
    # Piece by piece, 100 instances were 201 sendall calls; now the request's headers and
    # the test server's answer (in this process too) are the only ones.
    assert calls["sendall"] <= 3
    assert 1 <= calls["sendmsg"] < 20


def test_through_an_http_proxy_the_body_arrives_whole(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    server.answer(ANSWER)

    _client("http://kheops.example").stow(TOKEN, PARTS[:3])

    assert server.received[0].path == "http://kheops.example/api/studies"
    body = _body_of(server)
    assert body.index(PARTS[0]) < body.index(PARTS[1]) < body.index(PARTS[2])


@pytest.fixture
def tls_server() -> Iterator[RecordingServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CERTIFICATE, KEY)
    recording = RecordingServer(tls=context)
    yield recording
    recording.close()
    assert recording.unexpected == [], "requests the test did not script"


def test_over_tls_which_has_no_sendmsg_a_batch_goes_in_writes_of_a_mebibyte_and_all_arrive(
    tls_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls_server.answer(ANSWER)
    calls = _calls(monkeypatch, ssl.SSLSocket, "sendall")

    _client(tls_server.url, verify=str(CERTIFICATE)).stow(TOKEN, PARTS)

    assert tls_server.url.startswith("https://")
    body = _body_of(tls_server)
    assert [body.index(part) for part in PARTS] == sorted(body.index(part) for part in PARTS)
    # Buffer by buffer, 100 instances were 201 writes. Now: the body's, the request's headers
    # and the test server's answer (headers and body: in this process too).
    assert calls["sendall"] <= len(body) // TLS_WRITE + 1 + 1 + 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=30), st.integers(1, 400))
def test_joined_writes_carry_every_byte_in_order_and_a_large_buffer_goes_uncopied(
    buffers: list[bytes], size: int
) -> None:
    writes = list(_joined(buffers, size))

    assert b"".join(writes) == b"".join(buffers)
    for write, following in itertools.pairwise(writes):
        assert len(write) >= size or len(following) >= size  # cut short only by a large one
    assert all(any(w is b for w in writes) for b in buffers if len(b) >= size)
