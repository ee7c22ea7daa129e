"""Adversarial tests of the trigger daemon: races in the gate, reloads that go wrong, files and
listeners that misbehave, and bytes an outsider chooses.

Everything runs on real parts: a device root applied with `spos apply`, the real Gate writing
the real queue, the real TriggerDaemon stepped in-process, a real HTTP listener on 127.0.0.1,
real inotify and a pty for a serial device. A test either pins down behaviour that must hold or
says how the daemon could go wrong there.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import socket
import threading
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import pytest
from waiting import wait_for

from reconciler import AGENTS_DIR, STATE_DIR, TRIGGERS_DIR
from reconciler.device import Device
from reconciler.executor.enqueue import trigger_env, write_attachments
from reconciler.kinds.trigger import compile_trigger
from reconciler.triggers.base import MAX_EVENT_VALUE, Event, Registration
from reconciler.triggers.daemon import TriggerDaemon
from reconciler.triggers.gate import SEEN_DELIVERIES, Gate, _DeliveryLog
from reconciler.triggers.webhook import Listener, WebhookSource

AGENT, TASK = "watcher", "work"
WAIT = 5
SECRET = b"adversarial-secret-0123456789"


# -- a device root with one applied agent ----------------------------------------------------------


class Root:
    def __init__(self, path: Path):
        self.path = path
        self.device = Device(str(path))

    def host(self, device_path: str) -> Path:
        return self.path / device_path.lstrip("/")

    def register(self, trigger: str, spec: dict, **overrides) -> Path:
        """Writes the registration `spos apply` would write for this Trigger spec (atomically);
        `overrides` replace top-level fields of what it would write."""
        raw = compile_trigger(trigger, {"agent": AGENT, "task": TASK, **spec})
        raw.update(overrides)
        return self.write_registration(trigger, json.dumps(raw, indent=2, sort_keys=True) + "\n")

    def write_registration(self, name: str, text: str) -> Path:
        directory = self.host(TRIGGERS_DIR)
        directory.mkdir(parents=True, exist_ok=True)
        staged = directory / f".{name}.staged"
        staged.write_text(text)
        os.replace(staged, directory / f"{name}.json")
        return directory / f"{name}.json"

    def registration(self, name: str = "t", **policy) -> Registration:
        return Registration(name=name, agent=AGENT, task=TASK, type="filesystem", config={}, **policy)

    def loaded(self, name: str) -> Registration:
        raw = self.host(f"{TRIGGERS_DIR}/{name}.json").read_bytes()
        return Registration.from_json(json.loads(raw), hashlib.sha256(raw).hexdigest())

    def queued(self) -> list[dict]:
        queue = self.host(f"{AGENTS_DIR}/{AGENT}/queue")
        return [json.loads(p.read_text()) for p in sorted(queue.glob("*.json"))] if queue.is_dir() else []

    def finish(self, run_id: str) -> None:
        """Moves a queued run out of the queue, as an executor does once it ended."""
        done = self.host(f"{AGENTS_DIR}/{AGENT}/completed")
        done.mkdir(exist_ok=True)
        for record in self.host(f"{AGENTS_DIR}/{AGENT}/queue").glob(f"*-{run_id}.json"):
            record.rename(done / record.name)

    def attachment(self, run_id: str, name: str) -> bytes:
        """What the run finds in tmp/<run>/spos-trigger/, written out from its queue record as
        the executor does when the run starts (or written there already, a large one)."""
        [record] = [r for r in self.queued() if r["id"] == run_id]
        write_attachments(self.device, AGENT, record)
        return self.host(f"{AGENTS_DIR}/{AGENT}/tmp/{run_id}/spos-trigger/{name}").read_bytes()

    def files(self) -> set[str]:
        return {str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()}


@pytest.fixture
def root(tmp_path, spos) -> Root:
    manifests = tmp_path / "agents.d"
    manifests.mkdir()
    device = tmp_path / "device"
    device.mkdir()
    agent = {"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": AGENT},
             "spec": {"tasks": {TASK: {"command": ["/bin/true"], "concurrency": "Allow"}}}}
    (manifests / "site.yaml").write_text(json.dumps(agent) + "\n")
    result = spos("apply", manifests, "--root", device, "--auto-approve",
                  "--cgroup-root", tmp_path / "no-cgroups")
    assert result.code == 0, result.out + result.err
    return Root(device)


@pytest.fixture
def daemon(root):
    running = TriggerDaemon(root.device, listen=("127.0.0.1", 0), reload_interval=0.05)
    yield running
    running.shutdown()


def signature(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def write_secret(root: Root, device_path: str = "/etc/hook-secret") -> str:
    path = root.host(device_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET + b"\n")
    return device_path


def raw_post(port: int, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict]:
    """One POST with headers sent byte for byte as given (what http.client refuses to send)."""
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(head + body)
        return read_answer(connection)


def read_answer(connection: socket.socket) -> tuple[int, dict]:
    raw = b""
    while chunk := connection.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def passable(env: dict[str, str]) -> None:
    """What the executor's sandbox accepts and execve can carry: no NUL, bounded, encodable."""
    for key, value in env.items():
        assert key and "=" not in key and "\0" not in key, key
        assert "\0" not in value, (key, value[:80])
        assert len(value) <= MAX_EVENT_VALUE or not key.startswith("SPOS_EVENT_"), (key, len(value))
        os.fsencode(value)


# -- the gate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("delivery", ["a\r\n b", "x\x85y", "p\u2028q"], ids=["folded", "NEL", "LS"])
def test_a_delivery_id_with_a_line_break_is_remembered_as_itself_across_a_restart(root, delivery):
    """Delivery ids come from HTTP headers: a folded header gives `a\\r\\n b`, and http.server
    decodes headers as latin-1, so byte 0x85 is U+0085. The log must be read back split at
    newlines only (str.splitlines() also splits at U+0085, U+2028, \\v, \\f and \\x1c-\\x1e),
    or after a restart the id is not known and its first fragment is taken for a seen id."""
    registration = root.registration()
    gate = Gate(root.device, registration)
    assert gate(Event({}, delivery=delivery)).status == "queued"
    gate.close()

    restarted = Gate(root.device, registration)
    try:
        assert restarted(Event({}, delivery=delivery)).status == "duplicate", "forgotten after a restart"
        fragment = delivery[0]
        assert restarted(Event({}, delivery=fragment)).status == "queued", \
            f"delivery {fragment!r} was never sent but is dropped as a duplicate"
    finally:
        restarted.close()


def test_the_delivery_log_stays_bounded_and_a_restart_knows_the_latest_ids(root):
    """Pinned: however many deliveries arrive, the log holds at most twice SEEN_DELIVERIES
    lines, and a restarted daemon knows exactly the most recent SEEN_DELIVERIES."""
    total = 3 * SEEN_DELIVERIES
    log = _DeliveryLog(root.device, "t")
    for i in range(total):
        assert log.add(f"d-{i}")
    log.close()
    lines = root.host(f"/{STATE_DIR}/triggerd/deliveries/t").read_text().splitlines()
    assert len(lines) <= 2 * SEEN_DELIVERIES
    assert lines[-1].endswith(f"d-{total - 1}")

    again = _DeliveryLog(root.device, "t")
    assert not again.add(f"d-{total - 1}") and not again.add(f"d-{total - SEEN_DELIVERIES}")
    assert again.add(f"d-{total - SEEN_DELIVERIES - 1}")
    again.close()


def test_forbid_holds_for_a_run_that_trigger_test_queued_while_the_daemon_runs(root, spos):
    """A run queued by `spos trigger test` (another process, same trigger) counts for Forbid:
    the daemon queues no second run while the first is still waiting."""
    root.register("t", {"filesystem": {"path": "/srv"}, "concurrency": "Forbid"})
    gate = Gate(root.device, root.loaded("t"))
    first = gate(Event({}))
    assert first.status == "queued"
    root.finish(first.run)

    manual = spos("trigger", "test", "t", "--root", root.path)
    assert manual.code == 0, manual.out + manual.err
    [waiting] = root.queued()

    outcome = gate(Event({}))
    assert outcome.status == "skipped", f"queued {outcome.run} while {waiting['id']} still waits"
    gate.close()


def test_a_debounce_window_keeps_only_the_payload_it_hands_on(root):
    """A window keeps up to 1,000 events but only the last one's payload, the one handed to
    the run: whoever may publish to an MQTT topic (or send signed webhooks) cannot make the
    daemon hold 1,000 x the largest message in memory."""
    gate = Gate(root.device, root.registration(debounce_seconds=3600))
    size, count = 256 * 1024, 200
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            gate(Event({"topic": "t"}, payload=bytes([i % 256]) * size))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gate.close(flush=False)
    assert held < 8 * size, f"{held / 2**20:.0f} MiB held for one run's {size // 1024} KiB payload"


def test_closing_while_the_debounce_timer_fires_queues_each_window_exactly_once(root):
    """Pinned: close() racing the window's timer queues the window once, never twice or not at
    all; and a window discarded by close(flush=False) never fires afterwards."""
    windows = 24
    for attempt in range(windows):
        gate = Gate(root.device, root.registration(debounce_seconds=0.02))
        gate(Event({"n": str(attempt)}))
        time.sleep(0.015 + 0.0005 * attempt)  # from before to after the timer fires
        gate.close(flush=True)
    runs = root.queued()
    assert sorted(int(r["source"]["event"]["n"]) for r in runs) == list(range(windows))

    discarded = Gate(root.device, root.registration(debounce_seconds=0.02))
    discarded(Event({"n": "discarded"}))
    discarded.close(flush=False)
    time.sleep(0.1)
    assert len(root.queued()) == windows


def test_events_from_many_threads_at_once_are_all_counted_in_one_run(root):
    """Pinned: the gate is thread-safe; 8 threads x 50 events land in one window and one run."""
    gate = Gate(root.device, root.registration(debounce_seconds=0.3))
    outcomes: list[str] = []
    lock = threading.Lock()

    def send(thread: int) -> None:
        for i in range(50):
            status = gate(Event({"n": f"{thread}-{i}"})).status
            with lock:
                outcomes.append(status)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    wait_for(lambda: gate.counts.outcomes["queued"], "the window's run", WAIT)
    [run] = root.queued()
    assert outcomes == ["debounced"] * 400
    assert run["source"]["events"] == 400
    assert len(json.loads(root.attachment(run["id"], "events.json"))["events"]) == 400
    assert gate.counts.events == 400 and gate.counts.outcomes["queued"] == 1
    gate.close()


# -- the daemon -------------------------------------------------------------------------------------


def test_a_webhook_request_in_flight_during_a_reload_is_not_acknowledged_and_lost(root, daemon):
    """A reload stops the old source (its route) and closes its gate; a request whose headers
    were already routed must not be acknowledged into the closed gate (with a debounce it
    would join a window nothing ever queues, and a sender told 202 does not retry): it gets
    503, and its sender retries."""
    secret = write_secret(root)
    root.register("hook", {"webhook": {"path": "/h", "secretFile": secret}, "debounce": "1h"})
    daemon.step()
    port = daemon.listener.port
    body = b'{"ref": "main"}'
    head = (b"POST /h HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: " + signature(body).encode()
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(head)
        wait_for(lambda: daemon.listener.connections == 1, "the request to be served", WAIT)
        time.sleep(0.2)  # its headers are routed; it waits for the body
        root.register("hook", {"webhook": {"path": "/h", "secretFile": secret}, "debounce": "2h"})
        daemon.step()  # the trigger changed: the old one stops, the new one starts
        connection.sendall(body)
        code, answer = read_answer(connection)
    daemon.shutdown()  # flushes every open window

    if code == 202 and answer.get("status") in ("debounced", "queued"):
        assert len(root.queued()) == 1, f"answered {code} {answer} but no run was ever queued"


def test_a_symlinked_or_directory_registration_is_an_error_and_the_others_run(root, daemon, tmp_path):
    """Device.stat and Device.read_bytes refuse a link or a non-file: one odd entry in the
    registrations directory is an error of its own, never the end of the daemon (docs: "One
    trigger never stops another")."""
    root.register("good", {"continuous": {"interval": "1h"}})
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(compile_trigger("linked", {"agent": AGENT, "task": TASK,
                                                               "continuous": {"interval": "1h"}})))
    os.symlink(elsewhere, root.host(f"{TRIGGERS_DIR}/linked.json"))
    root.host(f"{TRIGGERS_DIR}/folder.json").mkdir()

    daemon.step()

    triggers = daemon.status()["triggers"]
    assert daemon.running["good"].source is not None
    assert triggers["linked"]["state"] == "error" and triggers["folder"]["state"] == "error"


def test_a_registration_that_is_not_a_json_object_is_an_error_and_the_others_run(root, daemon):
    """A registration holding a JSON list, or a `policy` that is a string, is an error of its
    own; the daemon goes on."""
    root.register("good", {"continuous": {"interval": "1h"}})
    root.write_registration("listed", "[]\n")
    root.register("policy", {"continuous": {"interval": "1h"}}, policy="Forbid")

    daemon.step()

    triggers = daemon.status()["triggers"]
    assert daemon.running["good"].source is not None
    assert triggers["listed"]["state"] == "error" and triggers["policy"]["state"] == "error"


def test_webhook_triggers_that_go_change_type_and_come_back_are_served(root, daemon):
    """Pinned: the listener closes with the last webhook trigger and opens again with the next
    one; a registration that turns from webhook into filesystem releases its path; a file whose
    name disagrees with its content is an error and its old trigger stops."""
    secret = write_secret(root)
    root.host("/srv").mkdir()
    root.register("a", {"webhook": {"path": "/a", "secretFile": secret}})
    daemon.step()
    first_port = daemon.listener.port
    assert raw_post(first_port, "/a", [(b"X-Hub-Signature-256", signature(b"1").encode())], b"1")[0] == 202

    root.register("a", {"filesystem": {"path": "/srv"}})
    daemon.step()
    assert daemon.listener is None and daemon.running["a"].registration.type == "filesystem"
    assert daemon.status()["triggers"]["a"]["state"] == "armed"

    root.register("a", {"webhook": {"path": "/a2", "secretFile": secret}})
    daemon.step()
    port = daemon.listener.port
    assert raw_post(port, "/a2", [(b"X-Hub-Signature-256", signature(b"2").encode())], b"2")[0] == 202
    assert raw_post(port, "/a", [(b"X-Hub-Signature-256", signature(b"3").encode())], b"3")[0] == 404

    root.register("a", {"webhook": {"path": "/a2", "secretFile": secret}}, name="b")
    daemon.step()
    assert "a" not in daemon.running and daemon.listener is None
    assert daemon.status()["triggers"]["a"]["state"] == "error"
    assert len(root.queued()) == 2


def test_a_secret_file_that_blocks_does_not_stall_the_daemon(root, daemon):
    """A secretFile that is a FIFO (or a hung network mount) must not block the daemon's loop:
    reloads, status and SIGTERM go on, and requests to the path are answered."""
    root.register("loop", {"continuous": {"interval": "1h"}})
    fifo = root.host("/etc/hook-fifo")
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    root.register("hook", {"webhook": {"path": "/h", "secretFile": "/etc/hook-fifo"}})

    stepper = threading.Thread(target=daemon.step, daemon=True)
    stepper.start()
    stepper.join(2)
    stalled = stepper.is_alive()
    for _ in range(100):  # let it go: feed each blocked open() a secret
        if not stepper.is_alive():
            break
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            time.sleep(0.02)
            continue
        os.write(fd, b"x")
        os.close(fd)
        time.sleep(0.02)
    stepper.join(WAIT)
    assert not stalled, "one step of the daemon blocked on the webhook's secret file"


def test_a_status_directory_the_daemon_cannot_write_does_not_end_it(root, daemon, tmp_path):
    """Device refuses to write through a link (triggerd/ pointed at tmpfs, say) or over a
    status.json that is not a file: the daemon then shows a stale status and goes on."""
    elsewhere = tmp_path / "run-triggerd"
    elsewhere.mkdir()
    os.symlink(elsewhere, root.host(f"/{STATE_DIR}/triggerd"))
    root.register("loop", {"continuous": {"interval": "1h"}})
    try:
        daemon.step()
        assert daemon.running["loop"].source is not None
        wait_for(root.queued, "the continuous trigger's run", WAIT)
    finally:
        os.unlink(root.host(f"/{STATE_DIR}/triggerd"))


# -- spos trigger list / test ------------------------------------------------------------------------


def test_trigger_list_shows_a_symlinked_registration_as_an_error_and_lists_the_others(root, spos, tmp_path):
    """A registration that is a link is listed as an error with its reason; `trigger list`
    lists the others and exits 0."""
    root.register("good", {"continuous": {"interval": "1h"}})
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    os.symlink(elsewhere, root.host(f"{TRIGGERS_DIR}/linked.json"))

    result = spos("trigger", "list", "--root", root.path, "--json")
    assert result.code == 0, result.err
    assert [t["name"] for t in json.loads(result.out)["triggers"]] == ["good", "linked"]


def test_trigger_list_text_survives_a_registration_whose_fields_are_not_strings(root, spos):
    """A hand-edited registration with `"type": 5` is listed like any other."""
    root.register("good", {"continuous": {"interval": "1h"}})
    root.write_registration("odd", json.dumps({"format": 1, "type": 5, "agent": AGENT}))

    result = spos("trigger", "list", "--root", root.path)
    assert result.code == 0
    assert "good" in result.out and "odd" in result.out


def test_trigger_test_on_a_registration_that_is_not_an_object_says_why(root, spos):
    """A registration holding a JSON list is an error message and exit 1, not a traceback."""
    root.write_registration("listed", "[]\n")
    result = spos("trigger", "test", "listed", "--root", root.path)
    assert result.code == 1 and "listed.json" in result.err


def test_trigger_list_json_has_the_documented_keys_whatever_the_state(root, spos):
    """Pinned (docs/triggers.md): `--json` gives daemon.listen and every count of every
    trigger, null while no daemon runs, so a reader can index them without checking."""
    root.register("t", {"continuous": {"interval": "1h"}})
    listing = json.loads(spos("trigger", "list", "--root", root.path, "--json").out)
    assert {"running", "pid", "detail", "listen"} <= set(listing["daemon"])
    documented = {"name", "type", "agent", "task", "enabled", "state", "detail", "events", "queued",
                  "debounced", "duplicate", "limited", "skipped", "disabled", "error", "lastEvent",
                  "lastFired", "lastRun", "lastError"}
    [entry] = listing["triggers"]
    assert documented <= set(entry), sorted(documented - set(entry))


def test_a_live_daemons_status_is_stale_after_three_of_its_own_heartbeats(root, spos):
    """`trigger list` calls a live daemon's status stale when it is older than three of the
    heartbeats the status itself names (`spos triggers --heartbeat`), 30 s each unless it says."""
    from reconciler.triggers.daemon import STATUS_FILE

    def shown(age: float, **fields) -> str:
        updated = datetime.fromtimestamp(time.time() - age, timezone.utc).isoformat()
        status = {"format": 1, "pid": os.getpid(), "startedAt": updated, "updatedAt": updated,
                  "listen": None, "triggers": {}, **fields}
        root.host(STATUS_FILE).parent.mkdir(parents=True, exist_ok=True)
        root.host(STATUS_FILE).write_text(json.dumps(status))
        return json.loads(spos("trigger", "list", "--root", root.path, "--json").out)["daemon"]["detail"]

    assert "not updated since" not in shown(20, heartbeatSeconds=10.0)
    assert "not updated since" in shown(40, heartbeatSeconds=10.0)
    assert "not updated since" not in shown(80)  # a status without it: 30 s
    assert "not updated since" in shown(100)
    for bad in ("soon", True, -5, 0.5, 1e9, float("nan"), float("inf")):
        assert "not updated since" in shown(100, heartbeatSeconds=bad), bad


def test_a_heartbeat_outside_a_second_to_an_hour_is_refused_before_anything_starts(root, spos):
    for value in ("0s", "500ms", "2h", "soon"):
        result = spos("triggers", "--root", root.path, "--heartbeat", value)
        assert result.code == 1 and "--heartbeat" in result.err, (value, result)


def test_trigger_test_never_reads_a_registration_outside_the_registrations_directory(root, spos):
    """Pinned: a NAME with a slash or dots names no trigger, whatever file it would reach."""
    root.register("t", {"continuous": {"interval": "1h"}})
    for name in ("../triggers/t", "/t", "..", "."):
        result = spos("trigger", "test", name, "--root", root.path, "--dry-run")
        assert result.code == 1 and "no trigger" in result.err, name
    assert root.queued() == []


# -- what an outsider can send ------------------------------------------------------------------------


def test_hostile_webhook_headers_reach_the_run_as_passable_env_and_nothing_leaks(root):
    """Pinned: NUL, latin-1 bytes and a 60 KB header in a signed request give the run
    environment values the sandbox accepts (no NUL, at most 4,096 characters); the secret is in
    no answer and no file the daemon writes; nothing is written outside the queue, the run's
    tmp/<run>/spos-trigger/ and the daemon's delivery log."""
    secret = write_secret(root)
    raw = compile_trigger("hook", {"agent": AGENT, "task": TASK,
                                   "webhook": {"path": "/h", "secretFile": secret}})
    registration = Registration.from_json(raw)
    gate = Gate(root.device, registration)
    listener = Listener(request_timeout=WAIT)
    listener.start()
    source = WebhookSource(registration, gate, listener, lambda p: str(root.host(p)))
    source.start()
    before = root.files()
    body = b"\x00\xff" + SECRET[::-1] + b"\r\n"
    try:
        code, answer = raw_post(listener.port, "/h?x=%00", [
            (b"X-Hub-Signature-256", signature(body).encode()),
            (b"X-GitHub-Event", b"push\x00\x85" + b"E" * 60000),
            (b"X-Spos-Delivery", b"d\x001"),
            (b"Content-Type", b"application/json\x00\xe9"),
        ], body)
        wrong = raw_post(listener.port, "/h", [(b"X-Hub-Signature-256", b"sha256=" + b"0" * 64)], body)
    finally:
        source.stop()
        listener.stop()
        gate.close()
    assert code == 202 and answer["status"] == "queued", answer
    assert wrong[0] == 401 and SECRET.decode() not in json.dumps(wrong[1])
    [run] = root.queued()
    assert run["id"] == answer["run"]
    run_tmp = root.host(f"{AGENTS_DIR}/{AGENT}/tmp/{run['id']}")
    write_attachments(root.device, AGENT, run)  # what the executor does as the run starts
    env = trigger_env(run["source"], "/run-tmp", str(run_tmp))
    passable(env)
    assert env["SPOS_EVENT_EVENT"].startswith("push\x85") and env["SPOS_PAYLOAD"] == "/run-tmp/spos-trigger/payload"
    assert root.attachment(run["id"], "payload") == body

    written = root.files() - before
    allowed = (f"{STATE_DIR}/agents/{AGENT}/queue/", f"{STATE_DIR}/agents/{AGENT}/tmp/{run['id']}/spos-trigger/",
               f"{STATE_DIR}/triggerd/deliveries/hook")
    assert all(name.startswith(allowed) for name in written), sorted(written)
    for name in root.files() - {secret.lstrip("/")}:
        assert SECRET not in (root.path / name).read_bytes(), f"the secret is in {name}"


def test_file_names_with_newlines_and_undecodable_bytes_reach_the_run_intact(root, daemon):
    """Pinned: a file whose name holds a newline, a byte that is not UTF-8, or 255 bytes is
    queued once, and the run's SPOS_EVENT_PATH is that file's exact path."""
    watched = root.host("/srv/in")
    watched.mkdir(parents=True)
    root.register("incoming", {"filesystem": {"path": "/srv/in", "events": ["close_write"]}})
    daemon.step()
    assert daemon.status()["triggers"]["incoming"]["state"] == "armed"
    names = [b"new\nline", b"bad\xffbyte\x1b[31m", b"n" * 255]
    for name in names:
        with open(os.fsencode(watched) + b"/" + name, "wb") as handle:
            handle.write(b"x")

    runs = wait_for(lambda: len(root.queued()) >= len(names) and root.queued(), "three runs", WAIT)
    paths = set()
    for run in runs:
        env = trigger_env(run["source"], "/run-tmp", str(root.host(f"{AGENTS_DIR}/{AGENT}/tmp/{run['id']}")))
        passable(env)
        paths.add(os.fsencode(env["SPOS_EVENT_PATH"]))
    assert paths == {b"/srv/in/" + name for name in names}
    assert len(runs) == len(names)


def test_serial_bytes_nul_and_an_endless_line_give_passable_env(root, daemon):
    """Pinned: NUL and undecodable bytes from a serial device, and a line far over its limit,
    become bounded event data the sandbox accepts; the payload keeps the raw bytes."""
    master, slave = os.openpty()
    try:
        root.host("/dev").mkdir()
        os.symlink(os.ttyname(slave), root.host("/dev/ttyUSB0"))
        root.register("sensor", {"serial": {"device": "/dev/ttyUSB0", "maxLineLength": 8192}})
        daemon.step()
        wait_for(lambda: daemon.status()["triggers"]["sensor"]["state"] == "armed", "the port to open", WAIT)
        os.write(master, b"\x00\xffT=1\x85\n")
        os.write(master, b"L" * 9000 + b"\n")
        runs = wait_for(lambda: len(root.queued()) >= 2 and root.queued(), "two runs", WAIT)
    finally:
        daemon.shutdown()
        os.close(master)
        os.close(slave)
    first, long = sorted(runs, key=lambda r: len(r["source"]["event"]["line"]))
    assert root.attachment(first["id"], "payload") == b"\x00\xffT=1\x85"
    assert long["source"]["event"]["truncated"] == "1"
    for run in runs:
        passable(trigger_env(run["source"], "/run-tmp", str(root.host(f"{AGENTS_DIR}/{AGENT}/tmp/{run['id']}"))))


def test_a_stop_that_comes_while_another_thread_nudges_still_wakes_the_loop(root):
    """nudge() from a signal handler used to give up when another thread was nudging at that
    moment, counting on that thread's write; but that write could have been read already, and
    the loop, asleep until the next heartbeat (30 s by default), did not see the stop:
    `spos triggers` could outlive SIGTERM by up to the heartbeat (and a count's change go
    unreported as long). Every nudge now writes to the loop's pipe."""
    running = TriggerDaemon(root.device, listen=("127.0.0.1", 0), heartbeat=30.0)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    wait_for(lambda: root.host(f"/{STATE_DIR}/triggerd/status.json").exists(), "the first status", WAIT)
    time.sleep(0.2)  # and the loop asleep
    running._nudge_lock.acquire()  # a source thread between its write (already read) and release
    stopping = threading.Thread(target=running.stop, daemon=True)
    stopping.start()
    time.sleep(0.1)
    running._nudge_lock.release()
    stopping.join(WAIT)
    thread.join(3)

    assert not thread.is_alive(), "the stopped daemon is still asleep"


def test_without_inotify_the_registrations_are_listed_every_reload_interval(root, monkeypatch):
    """Where inotify cannot watch (no instance left, the watch limit reached), the daemon
    looks at the registrations every `reload_interval` instead, and still runs them."""
    from reconciler.triggers import filesystem

    def refused(*_):
        raise filesystem.WatchFailed("inotify watch limit reached")

    monkeypatch.setattr(filesystem.Inotify, "add_watch", refused)
    running = TriggerDaemon(root.device, listen=("127.0.0.1", 0), reload_interval=0.1)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: running._seen_files == {}, "the first listing", WAIT)
        root.register("drop", {"continuous": {"interval": "1h"}})
        wait_for(lambda: "drop" in running.running, "the registration listed and started", 2)
        root.host(f"{TRIGGERS_DIR}/drop.json").unlink()
        wait_for(lambda: not running.running, "the registration gone", 2)
    finally:
        running.stop()
        thread.join(WAIT)
    assert not thread.is_alive()


def test_the_status_heartbeat_is_replaced_whole_without_syncing_the_disk(root, daemon, monkeypatch):
    """The daemon rewrites its status at least every heartbeat (30 s) for as long as it runs: a whole new
    file renamed over the old one each time, without the two fsyncs a durable write costs
    (flash storage on a small device wears by the write)."""
    from reconciler.triggers.daemon import STATUS_FILE

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    status = root.host(STATUS_FILE)
    daemon.step()
    first = status.stat().st_ino
    daemon.write_status(final=True)

    assert synced == []
    assert status.stat().st_ino != first  # replaced, not rewritten in place
    assert json.loads(status.read_text())["stoppedAt"]
    assert [p.name for p in status.parent.iterdir() if p.name != "deliveries"] == ["status.json"]


@pytest.mark.parametrize("inotify", [False, True], ids=["without inotify", "an event lost"])
def test_a_stream_of_events_does_not_hold_up_the_listing_of_registrations(root, monkeypatch, inotify):
    """Events keep changing a trigger's counts, so the status is rewritten at every pass; the
    registrations are still listed every `reload_interval` where inotify cannot watch, and
    at every heartbeat where it can (in case it missed something)."""
    from reconciler.triggers import daemon as daemon_module

    lose = []
    if inotify:
        real_drain = daemon_module._Watch.drain
        monkeypatch.setattr(daemon_module._Watch, "drain",
                            lambda self: real_drain(self) and not (lose and lose.pop()))
    else:
        monkeypatch.setattr(daemon_module._Watch, "arm", lambda self: None)
    root.register("busy", {"continuous": {"interval": "1h"}})
    running = TriggerDaemon(root.device, listen=("127.0.0.1", 0), reload_interval=1.0, heartbeat=2.0)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    streaming = threading.Event()

    def stream():
        while not streaming.wait(0.2):
            running.running["busy"].gate.counts.events += 1  # as a gate does, then nudges
            running.nudge()

    try:
        wait_for(lambda: "busy" in running.running, "the first registration started", WAIT)
        threading.Thread(target=stream, daemon=True).start()
        time.sleep(0.5)
        lose.append(True)  # the next inotify report goes missing
        root.register("late", {"continuous": {"interval": "1h"}})
        wait_for(lambda: "late" in running.running, "the late registration listed", 4)
    finally:
        streaming.set()
        running.stop()
        thread.join(WAIT)
