"""Webhook triggers: a signed HTTP POST to a path of the daemon's listener fires the trigger.

One `Listener` (the daemon's, handed to every source as `context.listener`) serves all webhook
triggers, one URL path each. Routes are added and removed while it serves, so a reload that
restarts one trigger never drops another trigger's requests. The listener owns what every
webhook shares: routing (404), the method (405, only POST), a declared body length (411, chunked
bodies are refused), a bounded number of connections (503 beyond it) and one deadline per
connection for its headers and body together (408), so a client that trickles bytes cannot hold
a thread.

Each `WebhookSource` then checks, in this order and before anything is parsed or emitted: the
declared length against `maxBodyBytes` (413, the body is not read), that its secret is readable
(503), and, after reading the body within the deadline, the `X-Hub-Signature-256` HMAC-SHA256
signature (401). With `timestampToleranceSeconds`, the signature also covers the
`X-Spos-Timestamp` header (`<timestamp>.<body>` is signed) and a timestamp outside the window is
rejected (401), so a captured request cannot be replayed later. Only then is the event emitted;
the answer says what became of it (see `response_for`).

Standard library only: http.server parses the request line and headers, except those of a
request that arrived whole, which the listener reads itself into the same form
(`_Handler._parse_plain`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import http.client
import http.server
import io
import json
import logging
import os
import re
import select
import selectors
import socket
import socketserver
import stat as stat_module
import threading
import time
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import Callable, NoReturn, Protocol

from reconciler.triggers.base import Context, Emit, Event, Outcome, Registration, Status

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_SCHEME = "sha256"
TIMESTAMP_HEADER = "X-Spos-Timestamp"
DELIVERY_HEADERS = ("X-GitHub-Delivery", "X-Spos-Delivery")
EVENT_HEADER = "X-GitHub-Event"

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""The body size limit of a registration that sets no `maxBodyBytes`."""

LINGER_SECONDS = 1.0
"""After answering without reading a declared body, how long the rest of it is received and
discarded before closing, so that closing does not reset the connection before the client has
read the answer."""

ACCEPT_PAUSE = 0.1
"""Seconds the listener waits before it accepts again after the process or the system ran out of
file descriptors (or memory) for a connection."""

DEFER_ACCEPT_SECONDS = 1
"""A connection is accepted once its client has sent something (TCP_DEFER_ACCEPT), or after
about this long: the listener then finds a request that arrived in one piece already there,
and serves it at once (`_whole_request`) instead of on a thread of its own. A client that
connects and sends nothing is accepted after that, and has the request timeout from then."""

INLINE_BYTES = 64 * 1024
"""A request up to this size (headers and body) that has arrived whole when its connection is
accepted is served on the listener's own thread (`_whole_request`)."""
MAX_HEAD_LINES = 100
"""http.client's limit on the lines of a header block, the blank one that ends it included (so
99 headers): http.server answers 431 beyond it. `_Handler._parse_plain` leaves a request with
more to http.server, which refuses it."""


_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_PLAIN_HEAD = re.compile(rb"[\x20-\x7e]+\r\n(?:[\x21-\x39\x3b-\x7e]+:[\t\x20-\x7e]*\r\n)*\r\n")
"""A request line and header block that http.server reads as the same lines: every line ends
in CRLF, no other byte breaks a line (a bare CR or LF does there), no line continues the one
before it, and every header has a name."""
_TIMESTAMP = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")

_ACKNOWLEDGED = {
    "debounced": HTTPStatus.ACCEPTED,
    "duplicate": HTTPStatus.OK,
    "limited": HTTPStatus.ACCEPTED,
    "skipped": HTTPStatus.ACCEPTED,
    "disabled": HTTPStatus.ACCEPTED,
}
"""Outcomes (besides queued) after which the sender must not retry: the event was received."""


@dataclass(frozen=True)
class Response:
    """What the listener answers: an HTTP status code, a small JSON body and extra headers.
    Every answer closes the connection."""

    code: int
    body: dict
    headers: tuple[tuple[str, str], ...] = ()


def refusal(code: int, reason: str) -> Response:
    """An error answer: `{"status": "error", "reason": reason}`. The reason is a short phrase
    for the sender; it never carries internals."""
    return Response(code, {"status": "error", "reason": reason})


@dataclass(frozen=True)
class Request:
    """One POST to a routed path whose headers have been read and whose body has not:
    `read_body()` reads exactly `content_length` bytes within the connection's deadline."""

    path: str
    headers: Message
    content_length: int
    read_body: Callable[[], bytes]


class Endpoint(Protocol):
    """What a listener route leads to."""

    def serve(self, request: Request) -> Response: ...


class _RequestTimeout(Exception):
    """The connection's deadline for its headers and body passed."""


class _IncompleteBody(Exception):
    """The client stopped sending before the declared Content-Length."""


class Listener:
    """The HTTP listener that serves every webhook trigger, one URL path each.

    `start()` binds `address`:`port` (0 picks a free port; `port` then tells which) and serves
    on daemon threads; `stop()` closes the listening socket and every open connection, and is
    idempotent. At most `max_connections` connections are served at once: one beyond that is
    answered 503 and closed at once. Each connection has `request_timeout` seconds in total to
    send its headers and body; a slower one is answered 408 (or closed) when that passes.
    """

    def __init__(self, address: str = "127.0.0.1", port: int = 0, *,
                 max_connections: int = 64, request_timeout: float = 10.0):
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {request_timeout}")
        self.address = address
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._requested_port = port
        self._routes: dict[str, Endpoint] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port while serving; the requested one before `start()`."""
        server = self._server
        return server.server_address[1] if server else self._requested_port

    @property
    def connections(self) -> int:
        """How many connections are being served right now."""
        server = self._server
        return server.open_connections() if server else 0

    def start(self) -> None:
        """Binds and starts serving; does nothing when already serving. Raises OSError when the
        address cannot be bound."""
        with self._lock:
            if self._server is not None:
                return
            server = _Server((self.address, self._requested_port), self)
            thread = threading.Thread(
                target=server.serve_until_woken,
                name=f"webhook-listener-{server.server_address[1]}", daemon=True)
            thread.start()
            self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stops accepting, closes the open connections (their threads end at once) and returns;
        calling it again does nothing. Routes are kept for a later `start()`."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.wake()
        thread.join(timeout=1.0)
        server.server_close()
        server.close_connections()

    def route(self, path: str, endpoint: Endpoint) -> None:
        """Serves `path` with `endpoint` from the next request on, replacing what served it."""
        with self._lock:
            self._routes[path] = endpoint

    def unroute(self, path: str, endpoint: Endpoint | None = None) -> None:
        """Stops serving `path` (404 from the next request on). Given `endpoint`, only when the
        path is still served by it: a trigger that stops after its replacement started does
        not take the path from the replacement."""
        with self._lock:
            if endpoint is None or self._routes.get(path) is endpoint:
                self._routes.pop(path, None)

    def endpoint(self, path: str) -> Endpoint | None:
        """What serves `path` now, if anything."""
        with self._lock:
            return self._routes.get(path)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threading TCP server that bounds its connections and can close them all."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], listener: Listener):
        self.listener = listener
        self._slots = threading.BoundedSemaphore(listener.max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._inline = threading.local()
        self._cannot_accept = False  # accepting fails for want of file descriptors (or memory)
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if ":" in address[0]:  # an IPv6 address (`--listen [::1]:9180`)
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)  # closes the pipe too when it cannot bind

    def server_bind(self) -> None:
        defer = getattr(socket, "TCP_DEFER_ACCEPT", None)  # Linux
        if defer is not None:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, defer, DEFER_ACCEPT_SECONDS)
        super().server_bind()

    def serve_until_woken(self) -> None:
        """Accept connections until `wake()`: the loop sleeps until a client connects or it is
        woken, so an idle listener costs no CPU (socketserver's own loop polls)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fd == self._wake_read for key, _ in ready):
                    return
                self._handle_request_noblock()
                if self.socket.fileno() < 0:  # closed while a request was served here
                    return
                if self._cannot_accept:  # the socket stays ready: wait (for a wake-up only)
                    if select.select([self._wake_read], [], [], ACCEPT_PAUSE)[0]:
                        return

    def get_request(self):
        """Accept a connection. When the process or the system has no file descriptor (or
        memory) left for it, the connection stays in the backlog and the loop waits
        ACCEPT_PAUSE before it tries again, instead of finding the socket ready at once, over
        and over, and spinning; said once in the log, and once more when accepting works
        again."""
        try:
            accepted = super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                if not self._cannot_accept:
                    log.warning("webhook listener: cannot accept a connection (%s); trying again "
                                "every %g s", exc.strerror, ACCEPT_PAUSE)
                self._cannot_accept = True
            raise
        if self._cannot_accept:
            log.warning("webhook listener: accepting connections again")
            self._cannot_accept = False
        return accepted

    def wake(self) -> None:
        try:
            os.write(self._wake_write, b"!")
        except OSError:
            pass

    def server_close(self) -> None:
        super().server_close()
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass

    def process_request(self, request, client_address):
        """Serves the connection on its own thread, or answers 503 at once when all slots are
        taken. A request that arrived whole with its connection is served here, on the
        listener's thread: it waits for nothing from its client, and starting a thread (and
        waking it) took a third of a millisecond before its first byte was read."""
        if not self._slots.acquire(blocking=False):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open.add(request)
        whole = _whole_request(request)
        if whole is not None:
            self._inline.request = whole
            try:
                self.process_request_thread(request, client_address)
            finally:
                self._inline.request = None
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def serving_inline(self) -> bool:
        """Whether this thread is serving a request that arrived whole (`process_request`)."""
        return self.inline_request() is not None

    def inline_request(self) -> bytes | None:
        """The request this thread serves because it arrived whole (`_whole_request`): still
        in the connection's receive buffer, to be read from it before anything else."""
        return getattr(self._inline, "request", None)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(request)
        self._slots.release()

    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    def close_connections(self) -> None:
        """Shuts down every open connection; their threads see the end of input and finish."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.exception("webhook listener: unexpected error serving %s", client_address[0])


def _whole_request(connection: socket.socket) -> bytes | None:
    """The request, when all of it is already in the connection's receive buffer: its headers
    and the body their Content-Length announces, INLINE_BYTES at most, and no chunked body or
    `Expect` to wait on; None otherwise. Looked at without reading (MSG_PEEK) or waiting
    (MSG_DONTWAIT); the request is then checked as any other. Only a plainly written header
    block (`_PLAIN_HEAD`) is looked at: in any other, http.server may find a Content-Length
    that this look does not, and wait for a body that is not there on the listener's thread.
    None too when more follows the request (a second request, more body than announced):
    only the request is read off the socket, and bytes left unread there make closing reset
    the connection, which can discard the answer; http.server's buffered reader takes them
    along with the request."""
    try:
        data = connection.recv(INLINE_BYTES + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or not _PLAIN_HEAD.fullmatch(data, 0, end + 4):
        return None
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if not colon or name in (b"transfer-encoding", b"expect"):
            return None
        if name == b"content-length":
            if not _CONTENT_LENGTH.fullmatch(value.decode("latin-1")):
                return None
            length = int(value)
    return data if end + 4 + length == len(data) <= INLINE_BYTES else None


def _take(connection: socket.socket, size: int) -> bytes:
    """Reads the `size` bytes `_whole_request` found buffered (fewer only if the client reset
    the connection meanwhile), without waiting."""
    parts, left = [], size
    while left:
        try:
            part = connection.recv(left, socket.MSG_DONTWAIT)
        except OSError:
            break
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _refuse_busy(connection: socket.socket) -> None:
    """Answers 503 without waiting for the client: the answer fits the socket buffer of a new
    connection, and nothing is sent if it does not."""
    try:
        connection.setblocking(False)
        connection.send(_encode(refusal(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")))
    except OSError:
        pass


def _encode(response: Response, head: bool = False) -> bytes:
    """The bytes of an HTTP/1.1 answer with a JSON body that closes the connection. With
    `head` (the answer to a HEAD request), the headers only: Content-Length is the body's that
    a GET would have had, and no body follows (RFC 9110, 9.3.2)."""
    body = json.dumps(response.body).encode()
    status = HTTPStatus(response.code)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


class _DeadlineReader(io.RawIOBase):
    """Reads a socket until a fixed moment: every read waits at most for what is left of it,
    so a client that trickles one byte at a time still runs out of time."""

    def __init__(self, connection: socket.socket, deadline: float):
        self._connection = connection
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _RequestTimeout()
        self._connection.settimeout(remaining)
        try:
            return self._connection.recv_into(buffer)
        except TimeoutError:
            raise _RequestTimeout() from None


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection: one request, one answer, then close."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        self.connection = self.request
        self.deadline = time.monotonic() + self.server.listener.request_timeout
        whole = self.server.inline_request()
        if whole is not None:  # all of it is buffered: read it at once, parse it from memory
            self.rfile = io.BytesIO(_take(self.connection, len(whole)))
        else:
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.deadline))
        self.wfile = self.connection.makefile("wb", buffering=0)
        self.body_pending = False

    def handle(self) -> None:
        self.close_connection = True
        try:
            self._handle_request()
        except OSError as error:
            log.debug("webhook client %s went away: %s", self.client_address[0], error)

    def _handle_request(self) -> None:
        try:
            self.handle_one_request()
        except _RequestTimeout:
            self._send(refusal(HTTPStatus.REQUEST_TIMEOUT, "request not received in time"))
        except _IncompleteBody:
            self._send(refusal(HTTPStatus.BAD_REQUEST, "body shorter than Content-Length"))
        else:
            if self.body_pending:
                self._discard_unread_body()

    def handle_one_request(self) -> None:
        """A request read whole (`setup`) whose head `_parse_plain` can read is answered at
        once; any other goes through http.server's parsing."""
        if isinstance(self.rfile, io.BytesIO) and self._parse_plain():
            self._send(self._answer())
        else:
            super().handle_one_request()

    def _parse_plain(self) -> bool:
        """Reads the request line and headers of a request held whole in memory, as http.server
        reads them (the same command, path, version and header values) without the email
        parser it uses, which took a third of the time to the first byte of the answer: only
        a plainly written head (`_PLAIN_HEAD`, checked in `_whole_request`) of an HTTP/1.0 or
        1.1 request within MAX_HEAD_LINES. False, having changed nothing, for any
        other; http.server then reads (and answers) it."""
        data = self.rfile.getvalue()
        end = data.find(b"\r\n\r\n")
        if end < 0 or not _PLAIN_HEAD.fullmatch(data, 0, end + 4):
            return False
        lines = data[:end].decode("iso-8859-1").split("\r\n")
        words = lines[0].split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1") or len(lines) > MAX_HEAD_LINES:
            return False
        headers = http.client.HTTPMessage()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name] = value.lstrip(" \t")
        self.raw_requestline = data[:data.index(b"\r\n") + 2]
        self.requestline = lines[0]
        self.command, path, self.request_version = words
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path  # as http.server
        self.headers = headers
        self.close_connection = True
        self.rfile.seek(end + 4)
        return True

    def parse_request(self) -> bool:
        """Parses the request line and headers as http.server does, then answers the request
        here; returns False so that http.server does nothing more (it would look for a
        `do_<METHOD>` method)."""
        if super().parse_request():
            self._send(self._answer())
        return False

    def _answer(self) -> Response:
        self.body_pending = _announces_body(self.headers)
        path = self.path.split("?", 1)[0]
        endpoint = self.server.listener.endpoint(path)
        if endpoint is None:
            return refusal(HTTPStatus.NOT_FOUND, "no webhook at this path")
        if self.command != "POST":
            return Response(HTTPStatus.METHOD_NOT_ALLOWED,
                            {"status": "error", "reason": "only POST is accepted"},
                            (("Allow", "POST"),))
        problem = _length_problem(self.headers)
        if problem is not None:
            return problem
        length = int(self.headers["Content-Length"].strip())
        request = Request(path, self.headers, length, lambda: self._read_body(length))
        try:
            return endpoint.serve(request)
        except (_RequestTimeout, _IncompleteBody, OSError):
            raise
        except Exception:
            log.exception("webhook %s: unexpected error serving a request", path)
            return refusal(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    def _read_body(self, length: int) -> bytes:
        """The declared body, read within the deadline; a client that asked to be told before
        sending it (`Expect: 100-continue`) is told now, once the checks before it passed."""
        if self.headers.get("Expect", "").strip().lower() == "100-continue":
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(length)
        if len(body) < length:
            raise _IncompleteBody()
        self.body_pending = False
        return body

    def handle_expect_100(self) -> bool:
        """Sends no interim answer yet: `_read_body` does, after the checks that need no body."""
        return True

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own refusals (a malformed request line, too many headers) as JSON."""
        self._send(refusal(code, HTTPStatus(code).phrase.lower()))

    def log_message(self, format, *args) -> None:
        log.debug("webhook client %s: %s", self.client_address[0], format % args)

    def _send(self, response: Response) -> None:
        self.connection.settimeout(self.server.listener.request_timeout)
        self.connection.sendall(_encode(response, head=getattr(self, "command", None) == "HEAD"))

    def _discard_unread_body(self) -> None:
        """After answering without reading a declared body: ends our side, then receives and
        discards what the client still sends for at most LINGER_SECONDS (and never past the
        deadline), so that closing does not reset the connection before the answer was read."""
        self.connection.shutdown(socket.SHUT_WR)
        if self.server.serving_inline():
            # The request was read whole (`setup`): read whatever came after it, so that
            # closing sends no reset, and wait for nothing more on the listener's thread.
            self.connection.setblocking(False)
            while True:
                try:
                    if not self.connection.recv(65536):
                        return
                except OSError:  # nothing more buffered (EAGAIN), or the client went away
                    return
        until = min(self.deadline, time.monotonic() + LINGER_SECONDS)
        while (remaining := until - time.monotonic()) > 0:
            self.connection.settimeout(remaining)
            try:
                if not self.connection.recv(65536):
                    return
            except TimeoutError:
                return


def _announces_body(headers: Message) -> bool:
    """Whether the client said it sends a body (one that an answer may come before)."""
    length = (headers.get("Content-Length") or "0").strip()
    return headers.get("Transfer-Encoding") is not None or length != "0"


def _length_problem(headers: Message) -> Response | None:
    """411 for a body without a declared length (none given, or a transfer encoding such as
    chunked), 400 for a length that is not one non-negative integer; None when it is fine."""
    if headers.get("Transfer-Encoding") is not None:
        return refusal(HTTPStatus.LENGTH_REQUIRED, "Content-Length required; chunked bodies are not accepted")
    values = {value.strip() for value in headers.get_all("Content-Length") or []}
    if not values:
        return refusal(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
    if len(values) > 1 or not _CONTENT_LENGTH.fullmatch(next(iter(values))):
        return refusal(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
    return None


class SecretUnavailable(Exception):
    """The webhook's secret file cannot be read (or is empty); the message says why without
    the secret."""


class SecretFile:
    """A shared secret kept in a file: read when first needed and again whenever the file's
    stat changes (a rotated secret is used from the next request on). A trailing newline is not
    part of the secret. The secret is never logged."""

    def __init__(self, host_path: str, device_path: str):
        self._host_path = host_path
        self._device_path = device_path
        self._lock = threading.Lock()
        self._stat_key: tuple | None = None
        self._secret: bytes | None = None
        self._problem = ""

    def read(self) -> bytes:
        """The current secret. Raises SecretUnavailable when the file cannot be read or is
        empty."""
        with self._lock:
            try:
                stat = os.stat(self._host_path)
            except OSError as error:
                self._stat_key = None
                self._fail(f"cannot read secret file {self._device_path}: {error.strerror}")
            key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            if key != self._stat_key:
                self._stat_key = key
                self._load()
            if self._secret is None:
                raise SecretUnavailable(self._problem)
            return self._secret

    def _load(self) -> None:
        try:
            secret = _read_regular(self._host_path).rstrip(b"\r\n")
        except OSError as error:
            self._fail(f"cannot read secret file {self._device_path}: {error.strerror}")
        if not secret:
            self._fail(f"secret file {self._device_path} is empty")
        if self._problem:
            log.info("webhook secret file %s is readable again", self._device_path)
        elif self._secret is not None:
            log.info("webhook secret file %s changed; its new secret is in use", self._device_path)
        self._secret, self._problem = secret, ""

    def _fail(self, problem: str) -> NoReturn:
        """Forgets the secret and raises SecretUnavailable(problem); logs each new problem once."""
        if problem != self._problem:
            log.warning("webhook %s", problem)
        self._secret, self._problem = None, problem
        raise SecretUnavailable(problem)


class WebhookSource:
    """One webhook trigger: serves its path on the shared listener while started, and emits one
    event per authenticated request (see the module docstring for the checks)."""

    def __init__(self, registration: Registration, emit: Emit, listener: Listener,
                 host: Callable[[str], str]):
        config = registration.config
        self.name = registration.name
        self.path = _config_path(config)
        self.max_body_bytes = _config_max_body(config)
        self.timestamp_tolerance = _config_tolerance(config)
        secret_file = config.get("secretFile")
        if not isinstance(secret_file, str) or not secret_file.startswith("/"):
            raise ValueError(f"webhook secretFile must be an absolute path, got {secret_file!r}")
        self._secret = SecretFile(host(secret_file), secret_file)
        self._emit = emit
        self._listener = listener

    def start(self) -> None:
        """Serves the path from the next request on (checking the secret once, for status)."""
        self.status()
        self._listener.route(self.path, self)

    def stop(self) -> None:
        """Stops serving the path, unless another trigger took it over meanwhile; idempotent."""
        self._listener.unroute(self.path, self)

    def status(self) -> Status:
        """armed while the secret is readable, error (saying why) while it is not."""
        try:
            self._secret.read()
        except SecretUnavailable as problem:
            return Status("error", str(problem))
        return Status("armed")

    def serve(self, request: Request) -> Response:
        """Checks one request in order (size, secret, body, signature, timestamp) and emits it
        only when all pass; answers with what became of it."""
        if request.content_length > self.max_body_bytes:
            return refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body larger than {self.max_body_bytes} bytes")
        try:
            secret = self._secret.read()
        except SecretUnavailable:
            return refusal(HTTPStatus.SERVICE_UNAVAILABLE, "webhook secret unavailable")
        body = request.read_body()
        problem = self.authentication_problem(request.headers, body, secret)
        if problem is not None:
            log.info("webhook trigger %s rejected a request: %s", self.name, problem)
            return refusal(HTTPStatus.UNAUTHORIZED, problem)
        return self._deliver(request, body)

    def authentication_problem(self, headers: Message, body: bytes, secret: bytes) -> str | None:
        """Why the request does not come from the secret's holder (now), or None when it does.
        The timestamp's window is checked only once the signature proved it genuine."""
        message = body
        stamp = None
        if self.timestamp_tolerance is not None:
            stamp = (headers.get(TIMESTAMP_HEADER) or "").strip()
            if not _TIMESTAMP.fullmatch(stamp):
                return f"missing or malformed {TIMESTAMP_HEADER}"
            message = stamp.encode("ascii") + b"." + body
        if not signature_matches(headers.get(SIGNATURE_HEADER), message, secret):
            return f"missing or invalid {SIGNATURE_HEADER}"
        if stamp is not None and abs(time.time() - float(stamp)) > self.timestamp_tolerance:
            return "timestamp outside the accepted window"
        return None

    def _deliver(self, request: Request, body: bytes) -> Response:
        headers = request.headers
        delivery = next((headers[name].strip() for name in DELIVERY_HEADERS if headers.get(name)), "")
        event = Event(
            data={
                "path": request.path,
                "delivery": delivery,
                "event": (headers.get(EVENT_HEADER) or "").strip(),
                "contentType": (headers.get("Content-Type") or "").strip(),
            },
            payload=body,
            delivery=delivery or None,
        )
        try:
            outcome = self._emit(event)
        except Exception:
            log.exception("webhook trigger %s: emitting an event failed", self.name)
            outcome = Outcome("error")
        return response_for(outcome)


def signature_matches(header: str | None, message: bytes, secret: bytes) -> bool:
    """Whether `header` is `sha256=<hex>` of HMAC-SHA256(secret, message), compared in
    constant time."""
    scheme, _, hex_digest = (header or "").strip().partition("=")
    if scheme != SIGNATURE_SCHEME:
        return False
    try:
        given = bytes.fromhex(hex_digest)
    except ValueError:
        return False
    expected = hmac.new(secret, message, hashlib.sha256).digest()
    return hmac.compare_digest(expected, given)


def response_for(outcome: Outcome) -> Response:
    """The answer to a sender whose event had this outcome: queued is 202 with the run's id;
    duplicate is 200 (acknowledged, not queued twice); debounced, limited, skipped and disabled
    are 202 with that status (received: the sender must not retry); error, and any status this
    module does not know, is 503 so that the sender retries."""
    if outcome.status == "queued":
        return Response(HTTPStatus.ACCEPTED, {"status": "queued", "run": outcome.run})
    code = _ACKNOWLEDGED.get(outcome.status)
    if code is None:
        return refusal(HTTPStatus.SERVICE_UNAVAILABLE, "the event could not be queued")
    return Response(code, {"status": outcome.status})


def _config_path(config: dict) -> str:
    path = config.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"webhook path must start with '/', got {path!r}")
    return path


def _config_max_body(config: dict) -> int:
    size = config.get("maxBodyBytes")
    if size is None:
        return DEFAULT_MAX_BODY_BYTES
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"webhook maxBodyBytes must be a non-negative integer, got {size!r}")
    return size


def _config_tolerance(config: dict) -> float | None:
    tolerance = config.get("timestampToleranceSeconds")
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"webhook timestampToleranceSeconds must be a non-negative number, got {tolerance!r}")
    return float(tolerance)


MAX_SECRET_BYTES = 64 * 1024


def _read_regular(path: str) -> bytes:
    """The content of a regular file. Opened without blocking, so that a FIFO or a device
    named as the secret file cannot hang the daemon; anything but a regular file is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read(MAX_SECRET_BYTES + 1)[:MAX_SECRET_BYTES]
    finally:
        os.close(fd)


def open_source(registration: Registration, emit: Emit, context: Context) -> WebhookSource:
    """A webhook source for `registration`, not yet started. Raises ValueError when the
    registration's webhook section is invalid or the daemon has no listener."""
    if context.listener is None:
        raise ValueError("webhook triggers need the trigger daemon's HTTP listener")
    return WebhookSource(registration, emit, context.listener, context.host)
