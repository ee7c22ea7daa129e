"""Webhook triggers over real HTTP: a real Listener on 127.0.0.1 (port 0), real clients
(http.client, and raw sockets for what http.client will not send), a secret file under a
temporary device root, and a stand-in for the gate that records every emitted event."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.triggers.base import Context, Event, Outcome, Registration, Status
from reconciler.triggers.webhook import Listener, open_source
from waiting import wait_for

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
"""GitHub's published test vector for X-Hub-Signature-256."""

PATH = "/hooks/github"
SECRET_FILE = "/etc/systemprompt-os/secrets/github-webhook"
SECRET = "s3cr3t-value-for-tests"
BOUND = 3.0
"""Seconds any single wait in these tests may take before it fails."""


class Gate:
    """Stands in for the trigger's gate: records every event it is handed and answers like the
    real gate does for delivery ids (queued the first time, duplicate after), or always with
    `outcome` when one is given."""

    def __init__(self, outcome: Outcome | None = None):
        self.outcome = outcome
        self.events: list[Event] = []
        self.queued: list[str] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> Outcome:
        with self._lock:
            self.events.append(event)
            if self.outcome is not None:
                return self.outcome
            if event.delivery is not None and event.delivery in self._seen:
                return Outcome("duplicate")
            if event.delivery is not None:
                self._seen.add(event.delivery)
            self.queued.append(f"r{len(self.queued) + 1}")
            return Outcome("queued", run=self.queued[-1])


@dataclass
class Reply:
    status: int
    body: dict | None
    headers: dict[str, str]


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "device"
    root.mkdir()
    return root


@pytest.fixture
def listener():
    listener = Listener(request_timeout=2.0)
    listener.start()
    yield listener
    listener.stop()


def write_secret(root: Path, secret: str, device_path: str = SECRET_FILE) -> None:
    """Replaces the secret file atomically, the way an operator rotates a secret."""
    path = root / device_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".new")
    staged.write_text(secret + "\n")
    os.replace(staged, path)


def webhook(root: Path, listener: Listener, gate: Gate, *, path: str = PATH, name: str = "github",
            max_body: int = 65536, tolerance: float | None = None, start: bool = True):
    registration = Registration(
        name=name, agent="webhook-handler", task="handle", type="webhook",
        config={"path": path, "secretFile": SECRET_FILE, "timestampToleranceSeconds": tolerance,
                "maxBodyBytes": max_body})
    context = Context(host=lambda device_path: str(root / device_path.lstrip("/")), listener=listener)
    source = open_source(registration, gate, context)
    if start:
        source.start()
    return source


def sign(secret: str, message: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed(body: bytes, secret: str = SECRET, **headers: str) -> dict[str, str]:
    return {"X-Hub-Signature-256": sign(secret, body), **headers}


def stamped(body: bytes, stamp: int, secret: str = SECRET, **headers: str) -> dict[str, str]:
    """Headers of a request with a timestamp that the signature covers."""
    return {"X-Spos-Timestamp": str(stamp),
            "X-Hub-Signature-256": sign(secret, f"{stamp}.".encode() + body), **headers}


def post(port: int, path: str, body: bytes | None, headers: dict[str, str] | None = None,
         method: str = "POST") -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, json.loads(data) if data else None, dict(response.getheaders()))
    finally:
        connection.close()


def connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    connection.settimeout(BOUND)
    return connection


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    received = b""
    deadline = time.monotonic() + BOUND
    while (remaining := deadline - time.monotonic()) > 0:
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    pytest.fail(f"the server did not close the connection within {BOUND}s")


def read_until(connection: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = connection.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def raw_request(path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- authentication ---------------------------------------------------------------------------


def test_githubs_published_vector_is_accepted_and_emitted_exactly(root, listener):
    write_secret(root, GITHUB_SECRET)
    gate = Gate()
    webhook(root, listener, gate)

    reply = post(listener.port, PATH, GITHUB_BODY, {
        "X-Hub-Signature-256": GITHUB_SIGNATURE,
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-GitHub-Event": "push",
        "Content-Type": "application/json",
    })

    assert (reply.status, reply.body) == (202, {"status": "queued", "run": "r1"})
    assert reply.headers["Content-Type"] == "application/json"
    assert gate.events == [Event(
        data={"path": PATH, "delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
              "event": "push", "contentType": "application/json"},
        payload=GITHUB_BODY,
        delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958",
    )]


def test_signatures_are_compared_in_constant_time_whatever_byte_differs(root, listener, monkeypatch):
    """Every request's signature, right or wrong in its first or its last byte, is checked by
    hmac.compare_digest over the two whole digests, whose time does not depend on where they
    differ; a byte-by-byte compare that stops early would tell an attacker how much of a
    forged signature is right."""
    from reconciler.triggers import webhook as webhook_module

    compared, real = [], hmac.compare_digest
    monkeypatch.setattr(webhook_module.hmac, "compare_digest",
                        lambda a, b: compared.append((bytes(a), bytes(b))) or real(a, b))
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate)
    body = b'{"zen": "timing"}'
    right = sign(SECRET, body)
    forged = {"first": right[:7] + ("0" if right[7] != "0" else "1") + right[8:],
              "last": right[:-1] + ("0" if right[-1] != "0" else "1")}

    answers = [post(listener.port, PATH, body, {"X-Hub-Signature-256": signature}).status
               for signature in (right, forged["first"], forged["last"])]

    assert answers == [202, 401, 401]
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).digest()
    assert [a == expected and len(b) == 32 for a, b in compared] == [True, True, True], compared
    assert [event.payload for event in gate.events] == [body]


def test_a_listener_on_an_ipv6_address_serves_there(root):
    ipv6 = Listener("::1", 0, request_timeout=2.0)
    ipv6.start()
    try:
        write_secret(root, SECRET)
        gate = Gate()
        webhook(root, ipv6, gate)
        body = b'{"zen": "ipv6"}'
        connection = http.client.HTTPConnection("::1", ipv6.port, timeout=BOUND)
        try:
            connection.request("POST", PATH, body=body, headers=signed(body))
            assert connection.getresponse().status == 202
        finally:
            connection.close()
        assert [event.payload for event in gate.events] == [body]
    finally:
        ipv6.stop()


@pytest.mark.parametrize("signature", [
    None,
    "sha256=" + "0" * 64,
    GITHUB_SIGNATURE.replace("sha256=", "sha1="),
    "sha256=not-hex",
    GITHUB_SIGNATURE[:-2],
    "",
], ids=["missing", "wrong digest", "other scheme", "not hex", "truncated", "empty"])
def test_a_request_without_a_valid_signature_is_401_and_nothing_is_emitted(root, listener, signature):
    write_secret(root, GITHUB_SECRET)
    gate = Gate()
    webhook(root, listener, gate)
    headers = {} if signature is None else {"X-Hub-Signature-256": signature}

    reply = post(listener.port, PATH, GITHUB_BODY, headers)

    assert reply.status == 401
    assert reply.body == {"status": "error", "reason": "missing or invalid X-Hub-Signature-256"}
    assert gate.events == []


def test_a_signature_over_a_different_body_is_401(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate)

    reply = post(listener.port, PATH, b'{"ref": "refs/heads/evil"}', signed(b'{"ref": "refs/heads/main"}'))

    assert reply.status == 401
    assert gate.events == []


def test_a_fresh_timestamp_covered_by_the_signature_is_accepted(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate, tolerance=300)
    body = b'{"sensor": 7}'

    reply = post(listener.port, PATH, body, stamped(body, int(time.time()), **{"X-Spos-Delivery": "d-1"}))

    assert (reply.status, reply.body) == (202, {"status": "queued", "run": "r1"})
    assert gate.events == [Event(
        data={"path": PATH, "delivery": "d-1", "event": "", "contentType": ""},
        payload=body, delivery="d-1")]


@pytest.mark.parametrize("headers, reason", [
    (lambda body, now: stamped(body, now - 3600), "timestamp outside the accepted window"),
    (lambda body, now: stamped(body, now + 3600), "timestamp outside the accepted window"),
    (lambda body, now: signed(body), "missing or malformed X-Spos-Timestamp"),
    (lambda body, now: {**signed(body), "X-Spos-Timestamp": str(now)},
     "missing or invalid X-Hub-Signature-256"),
    (lambda body, now: {**stamped(body, now - 3600), "X-Spos-Timestamp": str(now)},
     "missing or invalid X-Hub-Signature-256"),
    (lambda body, now: {**signed(body), "X-Spos-Timestamp": "soon"}, "missing or malformed X-Spos-Timestamp"),
], ids=["stale", "from the future", "missing", "not signed", "replaced after signing", "malformed"])
def test_a_request_outside_the_timestamp_window_or_with_an_unsigned_timestamp_is_401(
        root, listener, headers, reason):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate, tolerance=300)
    body = b'{"sensor": 7}'

    reply = post(listener.port, PATH, body, headers(body, int(time.time())))

    assert (reply.status, reply.body) == (401, {"status": "error", "reason": reason})
    assert gate.events == []


# --- what became of the event ----------------------------------------------------------------


def test_a_replayed_delivery_is_acknowledged_200_and_queued_only_once(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate)
    body = b'{"action": "opened"}'
    headers = signed(body, **{"X-GitHub-Delivery": "delivery-1", "X-GitHub-Event": "pull_request"})

    first = post(listener.port, PATH, body, headers)
    replay = post(listener.port, PATH, body, headers)

    assert (first.status, first.body) == (202, {"status": "queued", "run": "r1"})
    assert (replay.status, replay.body) == (200, {"status": "duplicate"})
    event = Event(data={"path": PATH, "delivery": "delivery-1", "event": "pull_request", "contentType": ""},
                  payload=body, delivery="delivery-1")
    assert gate.events == [event, event]
    assert gate.queued == ["r1"]


@pytest.mark.parametrize("outcome, status, body", [
    (Outcome("debounced"), 202, {"status": "debounced"}),
    (Outcome("limited"), 202, {"status": "limited"}),
    (Outcome("skipped"), 202, {"status": "skipped"}),
    (Outcome("disabled"), 202, {"status": "disabled"}),
    (Outcome("error", detail="queue directory /var/lib/x is full"), 503,
     {"status": "error", "reason": "the event could not be queued"}),
])
def test_the_answer_says_what_became_of_the_event(root, listener, outcome, status, body):
    write_secret(root, SECRET)
    gate = Gate(outcome)
    webhook(root, listener, gate)

    reply = post(listener.port, PATH, b"{}", signed(b"{}"))

    assert (reply.status, reply.body) == (status, body)
    assert [event.payload for event in gate.events] == [b"{}"]


# --- what the listener refuses before the body ------------------------------------------------


def test_an_unknown_path_is_404_and_a_method_other_than_post_is_405(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate)

    large = b"x" * (4 * 1024 * 1024)
    unknown = post(listener.port, "/hooks/other", large, signed(large))
    fetched = post(listener.port, PATH, None, method="GET")
    put = post(listener.port, PATH, b"{}", signed(b"{}"), method="PUT")

    assert (unknown.status, unknown.body) == (404, {"status": "error", "reason": "no webhook at this path"})
    assert (fetched.status, fetched.headers["Allow"]) == (405, "POST")
    assert (put.status, put.headers["Allow"]) == (405, "POST")
    assert gate.events == []

    connection = connect(listener.port)  # HEAD: the same answer's headers, and no body
    connection.sendall(raw_request(PATH, {}).replace(b"POST ", b"HEAD ", 1))
    head, _, rest = read_until_closed(connection).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ") and b"Allow: POST" in head and rest == b""


def test_a_body_without_a_declared_length_is_411(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate)

    no_length = connect(listener.port)
    no_length.sendall(raw_request(PATH, signed(b"")))
    chunked = post(listener.port, PATH, iter([b"{}"]), signed(b"{}"))  # http.client sends it chunked

    assert status_and_body(read_until_closed(no_length))[0] == 411
    assert chunked.status == 411
    assert gate.events == []


def test_an_oversize_body_is_answered_413_before_it_is_sent(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate, max_body=16)

    announced = connect(listener.port)
    announced.sendall(raw_request(PATH, {**signed(b""), "Content-Length": "10000000"}))

    assert status_and_body(read_until_closed(announced)) == (
        413, {"status": "error", "reason": "body larger than 16 bytes"})
    assert gate.events == []


def test_a_sender_that_sends_an_oversize_body_anyway_still_reads_the_413(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate, max_body=16)
    body = b"x" * (4 * 1024 * 1024)

    reply = post(listener.port, PATH, body, signed(body))

    assert (reply.status, reply.body) == (413, {"status": "error", "reason": "body larger than 16 bytes"})
    assert gate.events == []


def test_a_client_expecting_100_continue_is_told_only_after_the_checks_before_the_body(root, listener):
    write_secret(root, SECRET)
    gate = Gate()
    webhook(root, listener, gate, max_body=16)
    body = b'{"ok": true}'

    small = connect(listener.port)
    small.sendall(raw_request(PATH, {**signed(body), "Content-Length": str(len(body)),
                                     "Expect": "100-continue"}))
    interim = read_until(small, b"\r\n\r\n")
    small.sendall(body)
    final = read_until_closed(small)
    large = connect(listener.port)
    large.sendall(raw_request(PATH, {**signed(b""), "Content-Length": "1000", "Expect": "100-continue"}))

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert status_and_body(final) == (202, {"status": "queued", "run": "r1"})
    assert status_and_body(read_until_closed(large))[0] == 413
    assert [event.payload for event in gate.events] == [body]


# --- slow and too many clients ----------------------------------------------------------------


def test_headers_trickling_in_are_cut_off_at_the_deadline_while_others_are_served(root):
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener(request_timeout=0.5)
    listener.start()
    try:
        webhook(root, listener, gate)
        slow = connect(listener.port)
        stop_trickling = threading.Event()

        def trickle():
            try:
                slow.sendall(f"POST {PATH} HTTP/1.1\r\nX-Padding: ".encode())
                while not stop_trickling.wait(0.05):
                    slow.sendall(b"x")
            except OSError:
                pass

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        wait_for(lambda: listener.connections == 1, "the slow client to be accepted", BOUND)
        served = post(listener.port, PATH, b"{}", signed(b"{}"))
        answer = read_until_closed(slow)
        stop_trickling.set()
        trickler.join(BOUND)

        assert served.status == 202
        assert answer == b"" or status_and_body(answer)[0] == 408
        wait_for(lambda: listener.connections == 0, "the slow client's thread to end", BOUND)
        assert [event.payload for event in gate.events] == [b"{}"]
    finally:
        listener.stop()


def test_a_body_that_stops_midway_is_408_at_the_deadline_and_nothing_is_emitted(root):
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener(request_timeout=0.5)
    listener.start()
    try:
        webhook(root, listener, gate)
        body = b"x" * 100
        stalled = connect(listener.port)
        stalled.sendall(raw_request(PATH, {**signed(body), "Content-Length": "100"}, body[:10]))
        served = post(listener.port, PATH, b"{}", signed(b"{}"))

        assert served.status == 202
        assert status_and_body(read_until_closed(stalled)) == (
            408, {"status": "error", "reason": "request not received in time"})
        wait_for(lambda: listener.connections == 0, "the stalled client's thread to end", BOUND)
        assert [event.payload for event in gate.events] == [b"{}"]
    finally:
        listener.stop()


def test_a_connection_beyond_the_limit_is_answered_503_at_once(root):
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener(max_connections=1, request_timeout=1.0)
    listener.start()
    try:
        webhook(root, listener, gate)
        holder = connect(listener.port)
        holder.sendall(f"POST {PATH} HTTP/1.1\r\n".encode())
        wait_for(lambda: listener.connections == 1, "the first client to be accepted", BOUND)

        beyond_client = connect(listener.port)
        beyond_client.sendall(f"POST {PATH} HTTP/1.1\r\n".encode())
        beyond = status_and_body(read_until_closed(beyond_client))
        read_until_closed(holder)
        wait_for(lambda: listener.connections == 0, "the first client's slot to be freed", BOUND)
        after = post(listener.port, PATH, b"{}", signed(b"{}"))

        assert beyond == (503, {"status": "error", "reason": "too many connections"})
        assert after.status == 202
        assert [event.payload for event in gate.events] == [b"{}"]
    finally:
        listener.stop()


def test_a_client_that_connects_and_sends_nothing_takes_no_connection_slot(root):
    """A connection is accepted once its client has sent something (TCP_DEFER_ACCEPT): one that
    connects and says nothing keeps no slot from a sender that posts its request, even at a
    limit of one connection. It is accepted after about a second and then has the request
    timeout like any other client: answered 408 and closed."""
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener(max_connections=1, request_timeout=0.5)
    listener.start()
    try:
        webhook(root, listener, gate)
        silent = connect(listener.port)
        served = post(listener.port, PATH, b"{}", signed(b"{}"))
        answer = read_until_closed(silent)

        assert served.status == 202
        assert status_and_body(answer) == (
            408, {"status": "error", "reason": "request not received in time"})
        assert [event.payload for event in gate.events] == [b"{}"]
    finally:
        listener.stop()


def test_a_request_sent_a_moment_after_connecting_is_still_read_whole(root, monkeypatch):
    """A sender that connects, then sends its request a little later (as a client does after
    its TLS proxy or its own preparation): the listener takes the connection only once the
    request is there, so it is read whole, on the listener's thread, without a thread of its
    own."""
    from reconciler.triggers.webhook import _Handler

    parse_plain, read_plainly = _Handler._parse_plain, []
    monkeypatch.setattr(_Handler, "_parse_plain", lambda self: read_plainly.append(parse_plain(self))
                        or read_plainly[-1])
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener(request_timeout=BOUND)
    listener.start()
    try:
        webhook(root, listener, gate)
        client = connect(listener.port)
        time.sleep(0.2)
        assert listener.connections == 0
        client.sendall(raw_request(PATH, {**signed(b"{}"), "Content-Length": "2"}, b"{}"))
        answer = read_until_closed(client)

        assert status_and_body(answer)[0] == 202
        assert read_plainly == [True]
        assert [event.payload for event in gate.events] == [b"{}"]
    finally:
        listener.stop()


def test_a_request_that_arrived_whole_is_answered_in_full_and_holds_up_no_other(
        root, monkeypatch):
    """A request whose headers and body are all there when its connection is accepted is served
    at once. Answered without its body being read (an unknown path), it still gets its whole
    answer with no reset, and the listener waits for nothing more from that client: the next
    client is served while the first keeps its connection open."""
    from reconciler.triggers import webhook as webhook_module
    monkeypatch.setattr(webhook_module, "LINGER_SECONDS", 60.0)  # far past BOUND
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener(request_timeout=60.0)
    listener.start()
    try:
        webhook(root, listener, gate)
        body = b'{"unread": true}'
        lingering = connect(listener.port)
        lingering.sendall(raw_request("/hooks/unknown", {"Content-Length": str(len(body))}, body))
        answered = read_until(lingering, b"}")  # the answer, while the client keeps its side open

        after = post(listener.port, PATH, b"{}", signed(b"{}"))

        assert status_and_body(answered)[0] == 404
        assert after.status == 202 and [event.payload for event in gate.events] == [b"{}"]
        lingering.close()
    finally:
        listener.stop()


def send_before_accepted(listener: Listener, data: bytes) -> socket.socket:
    """Connects and sends `data` while the listener cannot yet look at the new connection, so
    that all of it has arrived when the listener does."""
    with listener._server._open_lock:  # taken by the listener between accept and looking
        client = connect(listener.port)
        client.sendall(data)
    return client


class Recorder:
    """An endpoint that records what it was handed: path, headers in order, length and body."""

    def __init__(self):
        self.seen: list[tuple] = []

    def serve(self, request):
        from reconciler.triggers.webhook import Response

        self.seen.append((request.path, list(request.headers.items()), request.content_length,
                          request.read_body()))
        return Response(202, {"status": "queued"})


def send_after_accepted(listener: Listener, data: bytes) -> socket.socket:
    """Connects, sends the first byte of `data` (the listener accepts a connection once its
    client has sent something), waits until the listener has taken the connection, then sends
    the rest: the request did not arrive whole, and is read on a connection thread by
    http.server."""
    client = connect(listener.port)
    client.sendall(data[:1])
    wait_for(lambda: listener.connections == 1, "the connection to be accepted", BOUND)
    client.sendall(data[1:])
    return client


PLAIN_HEADS = {
    "github": [b"POST /hooks/plain HTTP/1.1", b"Host: 127.0.0.1:8080", b"User-Agent: GitHub-Hookshot/1",
               b"X-GitHub-Event: push", b"X-GitHub-Delivery: 72d3162e", b"content-type: application/json",
               b"X-Hub-Signature-256: sha256=00ff", b"Content-Length: 2"],
    "odd-values": [b"POST /hooks/plain?x=1&y=2 HTTP/1.1", b"X-Tab:\t\tindented", b"X-Trailing: kept   ",
                   b"X-Empty:", b"X-Twice: one", b"x-twice: two", b"X-Colon: a:b: c", b"Content-Length: 2"],
    "double-slash": [b"POST //hooks//plain HTTP/1.1", b"Content-Length: 2"],
    "http-1.0": [b"POST /hooks/plain HTTP/1.0", b"Content-Length: 2"],
    "http-2.0": [b"POST /hooks/plain HTTP/2.0", b"Content-Length: 2"],
    "http-1.10": [b"POST /hooks/plain HTTP/1.10", b"Content-Length: 2"],
    "get": [b"GET /hooks/plain HTTP/1.1"],
    "two-words": [b"POST /hooks/plain", b"Content-Length: 2"],
    "99-headers": [b"POST /hooks/plain HTTP/1.1", *[b"X-N%d: v" % n for n in range(98)], b"Content-Length: 2"],
    "100-headers": [b"POST /hooks/plain HTTP/1.1", *[b"X-N%d: v" % n for n in range(99)], b"Content-Length: 2"],
}


READ_PLAINLY = {"github", "odd-values", "double-slash", "http-1.0", "get", "99-headers"}
"""The heads above that the listener reads itself; http.server reads (and refuses) the others."""


@pytest.mark.parametrize("name, head", PLAIN_HEADS.items(), ids=PLAIN_HEADS.keys())
def test_a_request_read_whole_is_read_as_http_server_reads_it(name, head, monkeypatch):
    """A request that arrived whole is parsed without http.server's email parser: the endpoint
    is handed the same path, headers (in order, names as sent) and body, and the client gets
    the same answer, as when the same bytes arrive later and http.server reads them."""
    from reconciler.triggers.webhook import _Handler

    parse_plain, read_plainly = _Handler._parse_plain, []
    monkeypatch.setattr(_Handler, "_parse_plain", lambda self: read_plainly.append(parse_plain(self))
                        or read_plainly[-1])
    recorder = Recorder()
    listener = Listener(request_timeout=BOUND)
    listener.route("/hooks/plain", recorder)
    listener.start()
    try:
        request = b"\r\n".join(head) + b"\r\n\r\n" + (b"{}" if b"Content-Length: 2" in head else b"")
        answers = []
        for send in (send_before_accepted, send_after_accepted):
            client = send(listener, request)
            answers.append(read_until_closed(client))
            client.close()
            wait_for(lambda: listener.connections == 0, "the connection to end", BOUND)
    finally:
        listener.stop()

    whole, trickled = answers
    assert read_plainly == [name in READ_PLAINLY]  # asked once: for the request read whole
    assert whole == trickled and whole.startswith(b"HTTP/1.1 ")
    assert len(recorder.seen) in (0, 2) and recorder.seen[:1] == recorder.seen[1:]


@pytest.mark.parametrize("line_break", [b"\n", b"\r"], ids=["bare-LF", "bare-CR"])
def test_a_header_line_break_without_crlf_cannot_make_the_listener_wait_for_a_body(
        root, line_break):
    """A header block whose lines are not all ended by CRLF is read by http.server with a
    Content-Length that a look for CRLF lines does not see: such a request must not be taken
    for one that arrived whole, or the listener would wait for its body and accept no one."""
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener(request_timeout=60.0)
    listener.start()
    try:
        webhook(root, listener, gate)
        hidden = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: x".encode() + line_break
                  + b"Content-Length: 100\r\n\r\n{}")
        stalled = send_before_accepted(listener, hidden)

        after = post(listener.port, PATH, b"{}", signed(b"{}"))

        assert after.status == 202 and [event.payload for event in gate.events] == [b"{}"]
        stalled.close()
    finally:
        listener.stop()


@pytest.mark.parametrize("after", [b"GET /hooks/plain HTTP/1.1\r\n\r\n", b"}"], ids=["pipelined", "overlong-body"])
def test_bytes_after_a_request_that_arrived_whole_get_its_answer_without_a_reset(after):
    """A client that sends more after its request (a second request, or more body than its
    Content-Length) gets its answer and a clean close, as when http.server reads it: its
    buffered reader takes such bytes off the socket along with the request. Left in the
    receive buffer, they make closing send a reset, which can discard the answer before the
    client has read it."""
    recorder = Recorder()
    listener = Listener(request_timeout=BOUND)
    listener.route("/hooks/plain", recorder)
    listener.start()
    try:
        answers, errors = [], []
        for send in (send_before_accepted, send_after_accepted):
            client = send(listener, b"POST /hooks/plain HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}" + after)
            answers.append(read_until_closed(client))
            wait_for(lambda: listener.connections == 0, "the connection to end", BOUND)
            errors.append(client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))  # EPIPE: reset
            client.close()
    finally:
        listener.stop()

    assert errors == [0, 0]
    assert answers[0] == answers[1] and status_and_body(answers[0])[0] == 202
    assert [seen[3] for seen in recorder.seen] == [b"{}", b"{}"]


# --- the secret -------------------------------------------------------------------------------


def test_a_rotated_secret_is_used_from_the_next_request_on(root, listener, caplog):
    caplog.set_level(logging.DEBUG)
    write_secret(root, "old-secret-value")
    gate = Gate()
    webhook(root, listener, gate)

    before = post(listener.port, PATH, b"1", signed(b"1", "old-secret-value"))
    write_secret(root, "the-new-secret-after-rotation")
    old = post(listener.port, PATH, b"2", signed(b"2", "old-secret-value"))
    new = post(listener.port, PATH, b"3", signed(b"3", "the-new-secret-after-rotation"))

    assert (before.status, old.status, new.status) == (202, 401, 202)
    assert [event.payload for event in gate.events] == [b"1", b"3"]
    assert "old-secret-value" not in caplog.text
    assert "the-new-secret-after-rotation" not in caplog.text


def test_an_unreadable_secret_is_503_and_an_error_status_until_it_is_readable(root, listener, caplog):
    caplog.set_level(logging.DEBUG)
    gate = Gate()
    source = webhook(root, listener, gate)

    missing = post(listener.port, PATH, b"{}", signed(b"{}"))
    missing_status = source.status()
    write_secret(root, "")
    empty_status = source.status()
    write_secret(root, SECRET)
    restored = post(listener.port, PATH, b"{}", signed(b"{}"))

    assert (missing.status, missing.body) == (503, {"status": "error", "reason": "webhook secret unavailable"})
    assert missing_status == Status("error", f"cannot read secret file {SECRET_FILE}: No such file or directory")
    assert empty_status == Status("error", f"secret file {SECRET_FILE} is empty")
    assert (restored.status, source.status()) == (202, Status("armed"))
    assert [event.payload for event in gate.events] == [b"{}"]
    assert SECRET not in caplog.text


# --- routes while serving ---------------------------------------------------------------------


def test_routes_are_added_and_removed_while_other_routes_keep_serving(root, listener):
    write_secret(root, SECRET)
    steady_gate, toggled_gate = Gate(), Gate()
    webhook(root, listener, steady_gate, path="/hooks/steady", name="steady")
    toggled = webhook(root, listener, toggled_gate, path="/hooks/toggled", name="toggled", start=False)
    steady_statuses: list[int] = []

    def keep_posting():
        for number in range(20):
            body = str(number).encode()
            steady_statuses.append(post(listener.port, "/hooks/steady", body, signed(body)).status)

    poster = threading.Thread(target=keep_posting, daemon=True)
    poster.start()
    toggled_statuses = []
    for _ in range(5):
        toggled.start()
        toggled_statuses.append(post(listener.port, "/hooks/toggled", b"on", signed(b"on")).status)
        toggled.stop()
        toggled_statuses.append(post(listener.port, "/hooks/toggled", b"off", signed(b"off")).status)
    poster.join(10 * BOUND)

    assert steady_statuses == [202] * 20
    assert [event.payload for event in steady_gate.events] == [str(n).encode() for n in range(20)]
    assert toggled_statuses == [202, 404] * 5
    assert [event.payload for event in toggled_gate.events] == [b"on"] * 5


def test_a_replacement_started_before_the_old_source_stops_keeps_the_path(root, listener):
    write_secret(root, SECRET)
    old_gate, new_gate = Gate(), Gate()
    old = webhook(root, listener, old_gate)
    webhook(root, listener, new_gate)
    old.stop()
    old.stop()

    reply = post(listener.port, PATH, b"{}", signed(b"{}"))

    assert reply.status == 202
    assert (old_gate.events, [event.payload for event in new_gate.events]) == ([], [b"{}"])


def test_stopping_the_listener_closes_open_connections_and_is_idempotent(root):
    write_secret(root, SECRET)
    listener = Listener(request_timeout=10.0)
    listener.start()
    webhook(root, listener, Gate())
    port = listener.port
    pending = connect(port)
    pending.sendall(b"POST /hoo")
    wait_for(lambda: listener.connections == 1, "the client to be accepted", BOUND)

    listener.stop()
    listener.stop()

    assert read_until_closed(pending) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=BOUND)


def test_a_listener_out_of_file_descriptors_waits_instead_of_spinning_and_then_serves(
        root, monkeypatch, caplog):
    """accept() failing for want of file descriptors leaves the connection in the backlog,
    where the socket stays ready: the listener tries again every ACCEPT_PAUSE, says so once,
    and serves the connection once accepting works again."""
    import errno as errno_module
    import socketserver

    from reconciler.triggers import webhook as webhook_module
    caplog.set_level(logging.WARNING)
    attempts, failing = [], threading.Event()
    failing.set()
    accept = socketserver.TCPServer.get_request

    def short_of_fds(server):
        attempts.append(time.monotonic())
        if failing.is_set():
            raise OSError(errno_module.EMFILE, "Too many open files")
        return accept(server)

    monkeypatch.setattr(socketserver.TCPServer, "get_request", short_of_fds)
    write_secret(root, SECRET)
    gate = Gate()
    listener = Listener()
    listener.start()
    try:
        webhook(root, listener, gate)
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            post(listener.port, PATH, b"{}", signed(b"{}"))))
        client.start()
        wait_for(lambda: len(attempts) >= 3, "accept to be tried again", BOUND)
        time.sleep(0.5)
        tried = len(attempts)
        failing.clear()
        client.join(BOUND)

        assert tried <= 0.5 / webhook_module.ACCEPT_PAUSE + 6, tried  # not thousands: no spin
        assert answers and answers[0].status == 202 and len(gate.events) == 1
        said = [r.getMessage() for r in caplog.records if "webhook listener" in r.getMessage()]
        assert len(said) == 2 and "cannot accept" in said[0] and "again" in said[1], said
    finally:
        listener.stop()
