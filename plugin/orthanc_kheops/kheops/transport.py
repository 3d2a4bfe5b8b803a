"""A request body handed to the socket as many buffers at once.

urllib3 sends an iterable body one piece at a time: two `sendall` calls per instance, each
giving up the GIL and waiting to take it back. While another worker holds the GIL for a read
(python plugin 4.0 never releases it during an SDK call), each of those waits can last the
whole switch interval, so a sender of 100 instances waited 200 times. A plain socket takes the
whole body in a few `sendmsg` calls (scatter-gather: the kernel copies from the buffers, nothing
is joined in Python): a drain of 64 KiB files went 1.07-1.15x as fast (bench/RESULTS.md). A TLS
socket has no `sendmsg`: there buffers are joined into writes of about `TLS_WRITE` bytes, a
copy that costs less than the waits it saves (64 KiB files over HTTPS: 1.15-1.19x as fast), and
a buffer that large goes alone, uncopied.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3 import PoolManager, ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_IOV_MAX = 1024  # most buffers one sendmsg takes (Linux's UIO_MAXIOV)
TLS_WRITE = 1 << 20


class Buffers:
    """Buffers sent back to back: urllib3 gives it to the connection as one piece."""

    def __init__(self, buffers: Sequence[bytes]) -> None:
        self.buffers = buffers

    def __iter__(self) -> Iterator[bytes]:
        # For a connection that is not ours (a SOCKS proxy's): http.client then sends each.
        return iter(self.buffers)

    def __bool__(self) -> bool:  # urllib3 skips an empty piece
        return any(self.buffers)


class Body:
    """A request body of buffers, with its length: urllib3 passes its `Buffers` on whole."""

    def __init__(self, buffers: Sequence[bytes], length: int) -> None:
        self._buffers = Buffers(buffers)
        self._length = length

    def __len__(self) -> int:  # requests sends a Content-Length, never a chunked body
        return self._length

    def __iter__(self) -> Iterator[Buffers]:
        yield self._buffers


def send_buffers(sock: Any, buffers: Sequence[bytes]) -> None:
    """Every byte of `buffers`, in order: with `sendmsg` on a plain socket, else in writes of
    about `TLS_WRITE` bytes.

    `sendmsg` may take only part of what it is given (a full send buffer, a timeout's slice);
    the rest goes in the next call, from where it stopped.
    """
    if type(sock) is not socket.socket:  # TLS (ssl.SSLSocket, urllib3's SSLTransport)
        for write in _joined(buffers, TLS_WRITE):
            sock.sendall(write)
        return
    pending: list[bytes | memoryview] = [buffer for buffer in buffers if buffer]
    first = 0
    while first < len(pending):
        sent = sock.sendmsg(pending[first : first + _IOV_MAX])
        while sent:
            size = len(pending[first])  # bytes, or a view of bytes: one byte per item
            if sent < size:
                pending[first] = memoryview(pending[first])[sent:]
                break
            sent -= size
            first += 1


def _joined(buffers: Sequence[bytes], size: int) -> Iterator[bytes]:
    """The buffers in order, small ones joined until they reach `size`; larger ones as they are."""
    run: list[bytes] = []
    length = 0
    for buffer in buffers:
        if len(buffer) >= size:
            if run:
                yield b"".join(run)
                run, length = [], 0
            yield buffer
            continue
        run.append(buffer)
        length += len(buffer)
        if length >= size:
            yield b"".join(run)
            run, length = [], 0
    if run:
        yield b"".join(run)


def _send(connection: HTTPConnection, data: Any) -> None:
    """The connections' `send`: `Buffers` whole, anything else as urllib3 sends it."""
    if isinstance(data, Buffers) and connection.sock is not None:
        send_buffers(connection.sock, data.buffers)
    else:
        HTTPConnection.send(connection, data)


class _BuffersConnection(HTTPConnection):
    send = _send


class _BuffersTlsConnection(HTTPSConnection):
    send = _send


class _Pool(HTTPConnectionPool):
    ConnectionCls = _BuffersConnection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _BuffersTlsConnection


def _use_buffer_pools(manager: PoolManager) -> None:
    manager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}


class BuffersAdapter(HTTPAdapter):
    """requests' adapter whose connections (direct or through a proxy) send `Buffers` whole."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _use_buffer_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> ProxyManager:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):  # a SOCKS proxy keeps its own pools
            _use_buffer_pools(manager)
        return manager
