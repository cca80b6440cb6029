"""A minimal HTTP/1.1 proxy that counts the requests passing through, by method.

The bench puts it between the CLI and SeaweedFS to count write requests (every PUT
and POST, multipart parts included) of one sync. It relays bytes unchanged; in the
client-to-server direction it reads each request head (method, Content-Length or
chunked framing) so that requests on a kept-alive connection are counted one by one.
The server-to-client direction is copied through as it comes.

Counting only: the proxy relays in Python threads, so timed runs go straight to the
server. (tests/support/proxy.py on branch i9f has a richer one with faults; it arrives
with a merge that also brings conflicting sync changes, so the bench keeps its own.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from types import TracebackType
from typing import Self

__all__ = ["CountingProxy"]

_CHUNK = 256 * 1024
_WRITES = ("PUT", "POST")


class _Closed(Exception):
    pass


class _Reader:
    """Buffered reads from a socket, forwarding everything read to ``sink``."""

    def __init__(self, sock: socket.socket, sink: socket.socket) -> None:
        self.sock = sock
        self.sink = sink
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise _Closed
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.sink.sendall(line + b"\r\n")
        return line

    def forward(self, n: int) -> None:
        while n > 0:
            if not self.buf:
                self._fill()
            part, self.buf = self.buf[:n], self.buf[n:]
            self.sink.sendall(part)
            n -= len(part)


class CountingProxy:
    """Listen on a free loopback port and relay to ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def writes(self) -> int:
        with self._lock:
            return sum(self.counts[m] for m in _WRITES)

    def reset(self) -> Counter[str]:
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        back = threading.Thread(target=self._pipe, args=(server, client), daemon=True)
        back.start()
        reader = _Reader(client, server)
        try:
            while True:
                self._request(reader)
        except (_Closed, OSError):
            pass
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _request(self, reader: _Reader) -> None:
        method = reader.line().split(b" ", 1)[0].decode("latin-1").upper()
        length, chunked = 0, False
        while line := reader.line():
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value.strip())
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        with self._lock:
            self.counts[method] += 1
        if chunked:
            while True:
                size = int(reader.line().split(b";", 1)[0], 16)
                reader.forward(size + 2)  # data and its CRLF
                if size == 0:
                    break
        else:
            reader.forward(length)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
