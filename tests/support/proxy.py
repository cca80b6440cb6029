"""A small HTTP-aware TCP proxy with switchable faults, for the fault suite.

``FaultProxy`` listens on a free loopback port and relays HTTP/1.1 to one upstream
(SeaweedFS), one request and its response at a time per connection (what obstore,
minio and httpx do: keep-alive, no pipelining). Because it knows where each request
and response begin and end, it can:

* forward normally (:meth:`forward`, the default; also clears every fault);
* stall: stop relaying bytes in both directions, optionally only once a request
  matching a predicate has had ``after_bytes`` of its body relayed (:meth:`stall`,
  :meth:`resume`); connections stay open, as on a dead link;
* drop the response of the next request matching a predicate, after the request
  reached the server and the server answered (:meth:`drop_response`): the client
  sees the connection close instead of the answer, the server has committed;
* hold the response of the next matching request (:meth:`hold_response`): the server
  has acted and answered, and the answer waits until :meth:`resume`;
* add latency: hold each request ``seconds`` before relaying it (:meth:`delay`), so
  that short operations last long enough for an overlap to show;
* refuse connections (:meth:`refuse`, :meth:`accept`): the listener is closed, so a
  connect gets ECONNREFUSED; open connections are cut;
* count requests by method (:attr:`counts`, :meth:`writes`) and log every exchange
  (:attr:`exchanges`) with its times, so tests can count write requests or check
  that two uploads never overlapped on the wire.

When the upstream cannot be reached (the server was killed), the client connection
is reset, as a dead server's would be. Threads, not asyncio: a stall is a blocked
thread, and tests drive the proxy from synchronous code.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from .process import HOST

__all__ = ["Exchange", "FaultProxy", "ProxyRequest"]

_CHUNK = 64 * 1024
_MAX_HEAD = 64 * 1024
_POLL_S = 0.05
_WRITE_METHODS = ("PUT", "POST", "DELETE")


@dataclass(frozen=True)
class ProxyRequest:
    """What a predicate sees of a request: method, target (path and query), headers."""

    method: str
    target: str
    headers: dict[str, str]  # lower-case names

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


@dataclass
class Exchange:
    """One request seen by the proxy and what became of it."""

    request: ProxyRequest
    started: float  # time.monotonic() when its head arrived
    finished: float | None = None  # when the response was relayed (or dropped)
    status: int | None = None  # the server's status, None if it never answered
    dropped: bool = False  # the answer was withheld by drop_response()


Predicate = Callable[[ProxyRequest], bool]


class _Closed(Exception):
    """A peer closed its side (or the proxy is stopping)."""


class _Reader:
    """Buffered reads from a socket, the HTTP framing way."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise _Closed
        self.buf += data

    def head(self) -> bytes | None:
        """Everything up to and including the blank line; None on a clean EOF first."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD:
                raise _Closed
            try:
                self._fill()
            except _Closed:
                if self.buf:
                    raise
                return None
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:end], self.buf[end:]
        return line

    def exactly(self, n: int) -> Iterator[bytes]:
        while n > 0:
            if not self.buf:
                self._fill()
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            yield piece

    def until_close(self) -> Iterator[bytes]:
        while True:
            if self.buf:
                piece, self.buf = self.buf, b""
                yield piece
            try:
                self._fill()
            except _Closed:
                return

    def chunked(self) -> Iterator[bytes]:
        """A chunked body relayed as is (sizes, data, trailers)."""
        while True:
            size_line = self.line()
            yield size_line
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:
                    trailer = self.line()
                    yield trailer
                    if trailer == b"\r\n":
                        return
            yield from self.exactly(size + 2)


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a crashed peer's kernel would answer.

    ``shutdown`` first: a plain close does not wake a thread blocked in ``recv``.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """HTTP/1.1 relay from ``endpoint`` to ``upstream_host:upstream_port``, with faults."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = HOST) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.counts: Counter[str] = Counter()
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopping = threading.Event()
        self._stall_on: tuple[Predicate, int] | None = None
        self._drop_on: Predicate | None = None
        self._hold_on: Predicate | None = None
        self._latency = 0.0
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    @classmethod
    def to(cls, endpoint: str) -> FaultProxy:
        """A proxy in front of ``http://HOST:PORT``."""
        hostport = endpoint.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        return cls(host, int(port))

    # ------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        self._stopping.clear()
        self._listen()
        return self

    def stop(self) -> None:
        """Stop listening, cut every connection and join the threads."""
        self._stopping.set()
        self._flowing.set()  # wake stalled threads so they notice the stop
        self._close_listener()
        self.cut_connections()
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --------------------------------------------------------------- faults
    def forward(self) -> None:
        """Relay normally: clears stall, pending drop and refusal."""
        self._stall_on = None
        self._drop_on = None
        self._hold_on = None
        self._latency = 0.0
        self._flowing.set()
        if self._listener is None and not self._stopping.is_set():
            self._listen()

    def delay(self, seconds: float) -> None:
        """Hold every request ``seconds`` before relaying it (0: no latency)."""
        self._latency = seconds

    def stall(self, match: Predicate | None = None, *, after_bytes: int = 0) -> None:
        """Stop relaying. With ``match``: once a matching request has had
        ``after_bytes`` of its body relayed (mid-transfer); else at once."""
        if match is None:
            self._flowing.clear()
        else:
            self._stall_on = (match, after_bytes)

    def resume(self) -> None:
        """Relay again what a stall held back."""
        self._stall_on = None
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def drop_response(self, match: Predicate) -> None:
        """Withhold the answer to the next request matching ``match`` (one shot)."""
        self._drop_on = match

    def hold_response(self, match: Predicate) -> None:
        """Relay the next request matching ``match`` whole, then stall before its answer
        reaches the client (one shot): the store has acted, the client still waits.
        :meth:`resume` lets the answer through."""
        self._hold_on = match

    def refuse(self) -> None:
        """Close the listener (connects are refused) and cut the open connections."""
        self._close_listener()
        self.cut_connections()

    def accept(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        if self._listener is None:
            self._listen()

    def cut_connections(self) -> None:
        """Reset every open connection, both sides."""
        with self._lock:
            socks = list(self._sockets)
        for sock in socks:
            _reset(sock)

    # ------------------------------------------------------------- counters
    def writes(self) -> int:
        """Requests that may change the store: PUT, POST, DELETE."""
        with self._lock:
            return sum(self.counts[m] for m in _WRITE_METHODS)

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.exchanges.clear()

    def seen(self, match: Predicate) -> list[Exchange]:
        """Exchanges so far whose request matches."""
        with self._lock:
            return [e for e in self.exchanges if match(e.request)]

    def wait_for(self, match: Predicate, *, timeout: float, what: str = "a request") -> Exchange:
        """Poll until a matching request has arrived; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.seen(match)
            if found:
                return found[0]
            time.sleep(_POLL_S)
        raise AssertionError(f"the proxy saw no {what} within {timeout:g}s")

    # ------------------------------------------------------------ internals
    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.settimeout(_POLL_S)
        self.port = int(sock.getsockname()[1])
        self._listener = sock
        thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True,
                                  name=f"proxy-accept-{self.port}")
        self._accepting = thread
        thread.start()

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()
        thread, self._accepting = self._accepting, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener and not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _gate(self) -> None:
        """Block while stalled; raise once the proxy stops."""
        while not self._flowing.wait(_POLL_S):
            if self._stopping.is_set():
                raise _Closed
        if self._stopping.is_set():
            raise _Closed

    def _send(self, sock: socket.socket, data: bytes) -> None:
        self._gate()
        sock.sendall(data)

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        upstream: socket.socket | None = None
        try:
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)  # the server is gone: the client sees a reset
                return
            upstream.settimeout(None)
            self._track(upstream)
            from_client, from_server = _Reader(client), _Reader(upstream)
            while self._relay_one(client, upstream, from_client, from_server):
                pass
        except (_Closed, OSError, ValueError):
            pass
        finally:
            self._untrack(client)
            if upstream is not None:
                self._untrack(upstream)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _relay_one(
        self, client: socket.socket, upstream: socket.socket,
        from_client: _Reader, from_server: _Reader,
    ) -> bool:
        """Relay one request and its response; False when the connection is done."""
        head = from_client.head()
        if head is None:
            return False
        request_line, headers = _parse_head(head)
        method, target = [*request_line.split(" "), "", ""][:2]
        request = ProxyRequest(method.upper(), target, headers)
        exchange = Exchange(request, time.monotonic())
        with self._lock:
            self.counts[request.method] += 1
            self.exchanges.append(exchange)
        drop = self._drop_on is not None and self._drop_on(request)
        if drop:
            self._drop_on = None
        stall = self._stall_on if self._stall_on and self._stall_on[0](request) else None
        hold = self._hold_on is not None and self._hold_on(request)
        if hold:
            self._hold_on = None

        if self._latency:
            time.sleep(self._latency)  # the fault itself (a slow link), not a wait for state
        self._send(upstream, head)
        sent = 0
        for piece in self._body(from_client, headers, request=True, method=request.method):
            if stall is not None and sent + len(piece) > stall[1]:
                keep = max(0, stall[1] - sent)
                if keep:
                    self._send(upstream, piece[:keep])
                self._stall_on = None
                self._flowing.clear()  # mid-transfer: nothing more goes anywhere
                self._send(upstream, piece[keep:])
                sent += len(piece)
                stall = None
                continue
            self._send(upstream, piece)
            sent += len(piece)

        while True:
            response = from_server.head()
            if response is None:
                raise _Closed
            status_line, response_headers = _parse_head(response)
            status = int(status_line.split(" ")[1])
            if status >= 200 or status == 101:
                break
            if not drop:  # 100 Continue and friends
                self._send(client, response)
        exchange.status = status
        if hold:
            self._flowing.clear()  # the store has answered; the client waits for it
        body = self._body(from_server, response_headers, request=False, method=request.method,
                          status=status)
        if drop:
            for _ in body:  # the server has answered; the client never hears it
                pass
            exchange.dropped = True
            exchange.finished = time.monotonic()
            _reset(client)
            return False
        # One piece behind, so ``finished`` is set before the client has it all.
        pending = response
        for piece in body:
            self._send(client, pending)
            pending = piece
        exchange.finished = time.monotonic()
        self._send(client, pending)
        closing = "close" in (headers.get("connection", "").lower(),
                              response_headers.get("connection", "").lower())
        framed = "content-length" in response_headers or "chunked" in response_headers.get(
            "transfer-encoding", "").lower() or request.method == "HEAD" or status in (204, 304)
        return not closing and framed

    @staticmethod
    def _body(
        reader: _Reader, headers: dict[str, str], *, request: bool, method: str,
        status: int = 200,
    ) -> Iterator[bytes]:
        if not request and (method == "HEAD" or status in (204, 304) or 100 <= status < 200):
            return iter(())
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return reader.chunked()
        if "content-length" in headers:
            return reader.exactly(int(headers["content-length"]))
        return iter(()) if request else reader.until_close()

