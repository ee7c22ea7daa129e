"""The trigger daemon keeps the promises of docs/triggers.md.

Trigger manifests are applied to a temporary device root with `spos apply`, and the real daemon
(`python -m reconciler triggers --root R`) runs against it as a subprocess: real inotify, a real
HTTP listener on 127.0.0.1, a pty standing in for a serial device, and thermal-zone files under
the root driving a temperature condition. Each test asserts what was queued and nothing more.
The gate's policy (debounce, rate limit, duplicates, Forbid) is tested in-process on a real
device root; one test runs a triggered action in the real executor and reads what it was told.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import termios
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sandboxes import remove_cgroups_of, sandbox_missing
from test_trigger_mqtt import MOSQUITTO, Broker, free_port
from waiting import wait_for

from reconciler.device import Device
from reconciler.executor.enqueue import write_attachments
from reconciler.triggers.base import Event, Registration
from reconciler.triggers.daemon import TriggerDaemon
from reconciler.triggers import gate as gate_module
from reconciler.triggers.gate import Gate

REPO = Path(__file__).resolve().parent.parent
STATE = "var/lib/systemprompt-os"
HEARTBEAT = 8  # seconds, for the tests that wait for one
AGENT = "watcher"
WAIT = 10


# -- a device with one agent and the triggers a test declares ------------------------------------


class Site:
    """A manifests directory, a device root, and the daemon and queue of that root."""

    def __init__(self, tmp_path: Path, spos):
        self.tmp_path = tmp_path
        self.spos = spos
        self.manifests = tmp_path / "agents.d"
        self.manifests.mkdir()
        self.root = tmp_path / "device"
        self.root.mkdir()
        self.daemon: subprocess.Popen | None = None

    def apply(self, triggers: dict[str, dict], tasks: dict | None = None) -> None:
        tasks = tasks or {"work": {"command": ["/bin/true"], "concurrency": "Allow"}}
        docs = [{"apiVersion": "spos/v1", "kind": "Agent", "metadata": {"name": AGENT},
                 "spec": {"tasks": tasks}}]
        for name, spec in triggers.items():
            docs.append({"apiVersion": "spos/v1", "kind": "Trigger", "metadata": {"name": name},
                         "spec": {"agent": AGENT, "task": "work", **spec}})
        (self.manifests / "site.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
        result = self.spos("apply", self.manifests, "--root", self.root, "--auto-approve",
                           "--cgroup-root", self.tmp_path / "no-cgroups")
        assert result.code == 0, result.out + result.err

    def path(self, device_path: str) -> Path:
        return self.root / device_path.lstrip("/")

    # -- the daemon ----------------------------------------------------------------------

    def start(self, reload_interval: str = "100ms", heartbeat: str = "30s",
              listen: str | None = "127.0.0.1:0", within: tuple[str, ...] = ()) -> None:
        """`listen` None: the daemon's default. `within`: a command that execs the daemon
        (its pid stays the daemon's)."""
        self.log = open(self.tmp_path / "triggers.log", "w")
        self.daemon = subprocess.Popen(
            [*within, sys.executable, "-m", "reconciler", "triggers", "--root", str(self.root),
             *(("--listen", listen) if listen else ()), "--reload-interval", reload_interval,
             "--heartbeat", heartbeat],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def status(self) -> dict:
        path = self.path(f"/{STATE}/triggerd/status.json")
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return status if status.get("pid") == self.daemon.pid else {}

    def wait_armed(self, *names: str) -> dict:
        def armed():
            triggers = self.status().get("triggers") or {}
            return all((triggers.get(n) or {}).get("state") == "armed" for n in names) and triggers
        return wait_for(armed, f"triggers {names} to be armed", WAIT)

    def stop(self) -> int:
        if self.daemon is None or self.daemon.poll() is not None:
            return self.daemon.returncode if self.daemon else 0
        self.daemon.send_signal(signal.SIGTERM)
        try:
            return self.daemon.wait(WAIT)
        finally:
            self.log.close()

    def output(self) -> str:
        return (self.tmp_path / "triggers.log").read_text()

    # -- the queue -----------------------------------------------------------------------

    def queued(self) -> list[dict]:
        queue = self.path(f"/{STATE}/agents/{AGENT}/queue")
        return [json.loads(p.read_text()) for p in sorted(queue.glob("*.json"))] if queue.is_dir() else []

    def attachment(self, run_id: str, name: str) -> bytes:
        """What the run finds in tmp/<run>/spos-trigger/, written out from its queue record as
        the executor does when the run starts (or written there already, a large one)."""
        [record] = [r for r in self.queued() if r["id"] == run_id]
        write_attachments(Device(str(self.root)), AGENT, record)
        return self.path(f"/{STATE}/agents/{AGENT}/tmp/{run_id}/spos-trigger/{name}").read_bytes()

    def wait_queued(self, count: int) -> list[dict]:
        return wait_for(lambda: len(self.queued()) >= count and self.queued(),
                        f"{count} queued run(s)", WAIT)

    def settled_queue(self, count: int, quiet: float = 0.4) -> list[dict]:
        """Exactly `count` runs, and no more after `quiet` seconds."""
        runs = self.wait_queued(count)
        time.sleep(quiet)
        assert self.queued() == runs, "more runs were queued than expected"
        assert len(runs) == count, runs
        return runs


@pytest.fixture
def site(tmp_path, spos):
    site = Site(tmp_path, spos)
    yield site
    if site.daemon is not None and site.daemon.poll() is None:
        site.daemon.kill()
        site.daemon.wait(5)
    remove_cgroups_of(site.root)  # `executor --once` made the agent's cgroups


def signed(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except urllib.error.URLError:
        return 0, {}  # nothing listens


# -- the daemon, one source kind at a time ---------------------------------------------------------


def test_a_file_created_in_a_watched_directory_queues_one_run(site):
    site.path("/srv/in").mkdir(parents=True)
    site.apply({"incoming": {"filesystem": {"path": "/srv/in", "events": ["close_write"],
                                            "patterns": ["*.csv"]}}})
    site.start()
    site.wait_armed("incoming")

    site.path("/srv/in/a.csv").write_text("1,2\n")
    site.path("/srv/in/notes.txt").write_text("not a csv\n")

    [run] = site.settled_queue(1)
    assert run["source"] == {"kind": "trigger", "trigger": "incoming", "type": "filesystem",
                             "event": {"path": "/srv/in/a.csv", "event": "close_write", "name": "a.csv"},
                             "events": 1}
    events = json.loads(site.attachment(run["id"], "events.json"))
    assert events["events"] == [run["source"]["event"]]
    assert site.stop() == 0


def test_a_second_daemon_on_the_same_device_refuses_to_start_and_events_queue_once(site):
    site.path("/srv/in").mkdir(parents=True)
    site.apply({"incoming": {"filesystem": {"path": "/srv/in", "events": ["close_write"]}}})
    site.start()
    site.wait_armed("incoming")

    second = subprocess.run(
        [sys.executable, "-m", "reconciler", "triggers", "--root", str(site.root),
         "--listen", "127.0.0.1:0"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT)
    assert second.returncode == 1
    assert f"another trigger daemon (pid {site.daemon.pid}) already serves" in second.stderr
    assert site.status()["pid"] == site.daemon.pid and "stoppedAt" not in site.status()

    site.path("/srv/in/a.csv").write_text("1\n")
    site.settled_queue(1)
    assert site.stop() == 0


def test_a_signed_webhook_queues_a_run_with_its_body_and_a_bad_one_nothing(site):
    secret = b"s3cret"
    site.path("/etc/hooks").mkdir(parents=True)
    site.path("/etc/hooks/secret").write_bytes(secret + b"\n")
    site.apply({"hook": {"webhook": {"path": "/hooks/deploy", "secretFile": "/etc/hooks/secret"}}})
    site.start()
    listen = site.wait_armed("hook") and site.status()["listen"]
    url = f"http://{listen}/hooks/deploy"
    body = b'{"ref": "refs/heads/main"}'

    bad = post(url, body, {"X-Hub-Signature-256": signed(b"wrong", body), "Content-Type": "application/json"})
    good = post(url, body, {"X-Hub-Signature-256": signed(secret, body), "X-GitHub-Delivery": "d-1",
                            "X-GitHub-Event": "push", "Content-Type": "application/json"})
    again = post(url, body, {"X-Hub-Signature-256": signed(secret, body), "X-GitHub-Delivery": "d-1"})

    assert bad[0] == 401
    assert good[0] == 202 and good[1]["status"] == "queued"
    assert again == (200, {"status": "duplicate"})
    [run] = site.settled_queue(1)
    assert run["id"] == good[1]["run"]
    assert run["source"]["event"]["event"] == "push" and run["source"]["delivery"] == "d-1"
    assert site.attachment(run["id"], "payload") == body
    assert site.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip for a network namespace of its own")
def test_the_listener_is_on_loopback_port_9180_by_default(site):
    """Without --listen the webhooks are served on 127.0.0.1:9180, never on every address. The
    daemon runs in a network namespace of its own, so nothing else on the machine holds the
    port, and what it listens on is read from the kernel (/proc/PID/net/tcp), not its status."""
    site.path("/etc/hooks").mkdir(parents=True)
    site.path("/etc/hooks/secret").write_bytes(b"s3cret")
    site.apply({"hook": {"webhook": {"path": "/hooks/deploy", "secretFile": "/etc/hooks/secret"}}})
    site.start(listen=None, within=("unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"))
    try:
        status = site.wait_armed("hook") and site.status()
        listening = []
        for line in Path(f"/proc/{site.daemon.pid}/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # TCP_LISTEN
                address, port = local.split(":")
                listening.append((".".join(str(b) for b in bytes.fromhex(address)[::-1]), int(port, 16)))
    finally:
        assert site.stop() == 0, site.output()
    assert status["listen"] == "127.0.0.1:9180"
    assert listening == [("127.0.0.1", 9180)]


def test_webhook_requests_refused_by_the_daemon_queue_nothing(site):
    """Through the real daemon: a body over the trigger's maxBodySize is 413, a correctly
    signed request whose signed timestamp is outside the tolerance (a replay) is 401, and
    neither queues anything; the same request signed now is queued, once."""
    secret = b"s3cret"
    site.path("/etc/hooks").mkdir(parents=True)
    site.path("/etc/hooks/secret").write_bytes(secret)
    site.apply({"hook": {"webhook": {"path": "/hooks/deploy", "secretFile": "/etc/hooks/secret",
                                     "maxBodySize": "1K", "timestampTolerance": "5m"}}})
    site.start()
    url = f"http://{site.wait_armed('hook') and site.status()['listen']}/hooks/deploy"

    def stamped(body: bytes, at: float) -> dict:
        stamp = str(int(at))
        return {"X-Spos-Timestamp": stamp, "X-Hub-Signature-256": signed(secret, stamp.encode() + b"." + body)}

    big, body = b"x" * 1025, b'{"ref": "main"}'
    oversize = post(url, big, stamped(big, time.time()))
    replayed = post(url, body, stamped(body, time.time() - 600))
    fresh = post(url, body, stamped(body, time.time()))

    assert (oversize[0], replayed[0], fresh[0]) == (413, 401, 202)
    [run] = site.settled_queue(1)
    assert run["id"] == fresh[1]["run"] and site.attachment(run["id"], "payload") == body
    assert site.stop() == 0


def test_a_serial_line_queues_a_run_with_the_line(site):
    """The device is opened at the manifest's baud rate (a pty starts at 38400) and each line
    it sends queues a run with the line."""
    master, slave = os.openpty()
    try:
        site.path("/dev").mkdir()
        os.symlink(os.ttyname(slave), site.path("/dev/ttyUSB0"))
        site.apply({"sensor": {"serial": {"device": "/dev/ttyUSB0", "baudrate": 115200}}})
        before = termios.tcgetattr(slave)[4:6]
        site.start()
        site.wait_armed("sensor")
        speeds = termios.tcgetattr(slave)[4:6]  # input and output speed, shared by every opener
        os.write(master, b"T=21.4 H=48.2\r\n")
        [run] = site.settled_queue(1)
    finally:
        site.stop()
        os.close(master)
        os.close(slave)
    assert (before, speeds) == ([termios.B38400] * 2, [termios.B115200] * 2)
    assert run["source"]["event"]["line"] == "T=21.4 H=48.2"
    assert site.attachment(run["id"], "payload") == b"T=21.4 H=48.2"


@pytest.mark.skipif(not MOSQUITTO.exists(), reason="mosquitto is not installed (apt-get install mosquitto)")
def test_an_mqtt_message_queues_a_run_with_its_topic_and_payload(site, tmp_path):
    """Against a real mosquitto on a loopback port: a message on a topic the filter matches
    queues one run with its topic and its bytes; one on another topic queues nothing."""
    import paho.mqtt.publish as publish

    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker", free_port())
    broker.start()
    try:
        site.apply({"alarms": {"mqtt": {"broker": f"mqtt://127.0.0.1:{broker.port}", "topic": "site/+/alarm",
                                        "qos": 1}}})
        site.start()
        site.wait_armed("alarms")  # subscribed: the broker acknowledged the filter
        for topic, payload in (("site/door/status", b"closed"), ("site/door/alarm", b"OPEN\x00\xff")):
            publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=broker.port)
        [run] = site.settled_queue(1)
    finally:
        site.stop()
        broker.kill()
    assert run["source"]["event"] == {"topic": "site/door/alarm", "qos": "1", "retained": "0"}
    assert site.attachment(run["id"], "payload") == b"OPEN\x00\xff"


def test_a_temperature_condition_fires_once_per_crossing(site):
    zone = site.path("/sys/class/thermal/thermal_zone0")
    zone.mkdir(parents=True)
    (zone / "temp").write_text("40000\n")
    site.apply({"hot": {"condition": {"metric": "cpu_temp", "above": 80, "for": "300ms",
                                      "interval": "50ms"}}})
    site.start()
    site.wait_armed("hot")

    (zone / "temp").write_text("85000\n")
    [first] = site.settled_queue(1, quiet=0.6)  # it keeps holding: no second run
    assert first["source"]["event"]["value"] == "85.0"
    (zone / "temp").write_text("40000\n")
    wait_for(lambda: site.status()["triggers"]["hot"]["state"] == "armed", "the condition to re-arm", WAIT)
    (zone / "temp").write_text("90000\n")
    site.settled_queue(2)
    assert site.stop() == 0


def test_a_continuous_trigger_never_overlaps_its_own_run(site):
    site.apply({"loop": {"continuous": {"interval": "200ms"}}})
    site.start()
    [first] = site.settled_queue(1, quiet=0.8)  # still queued: no second one
    queue = site.path(f"/{STATE}/agents/{AGENT}/queue")
    done = site.path(f"/{STATE}/agents/{AGENT}/completed")
    done.mkdir(exist_ok=True)
    for record in queue.glob("*.json"):  # as an executor would when the run ended
        record.rename(done / record.name)
    [second] = site.wait_queued(1)
    assert second["id"] != first["id"]
    assert site.stop() == 0


# -- reloading and stopping -------------------------------------------------------------------------


def test_apply_changing_triggers_reloads_them_and_leaves_the_others_running(site):
    for directory in ("/srv/a", "/srv/c"):
        site.path(directory).mkdir(parents=True)
    site.path("/etc").mkdir()
    site.path("/etc/secret").write_bytes(b"x")
    a = {"filesystem": {"path": "/srv/a", "events": ["close_write"]}}
    site.apply({"a": a, "b": {"webhook": {"path": "/hooks/b", "secretFile": "/etc/secret"}}})
    site.start()
    listen = site.wait_armed("a", "b") and site.status()["listen"]
    site.path("/srv/a/1").write_text("one")
    site.wait_queued(1)

    site.apply({"a": a, "c": {"filesystem": {"path": "/srv/c", "events": ["close_write"]}}})
    triggers = site.wait_armed("a", "c")
    assert "b" not in triggers
    assert triggers["a"]["events"] == 1, "an unchanged trigger is not restarted (its counts go on)"
    # with no webhook trigger left, the listener is closed
    assert post(f"http://{listen}/hooks/b", b"{}", {})[0] == 0

    site.path("/srv/a/2").write_text("two")
    site.path("/srv/c/3").write_text("three")
    runs = site.settled_queue(3)
    assert sorted(r["source"]["event"]["name"] for r in runs) == ["1", "2", "3"]
    assert site.stop() == 0


def test_registrations_and_counts_are_followed_without_looking_for_them(site):
    """Applied registrations reach the daemon through inotify, and a trigger's counts reach its
    status as they change: with the listing of registrations every hour, each step happens well
    within the status heartbeat (here 8 s), also before the first apply made the state directory,
    after the registrations directory was removed and made again, and after the state directory
    was moved away and made again (which inotify does not report)."""
    soon = 3  # seconds: before the heartbeat would list the registrations
    for directory in ("/srv/a", "/srv/b"):
        site.path(directory).mkdir(parents=True)
    a = {"filesystem": {"path": "/srv/a", "events": ["close_write"]}}
    b = {"filesystem": {"path": "/srv/b", "events": ["close_write"]}}

    def armed(*names):
        triggers = site.status().get("triggers") or {}
        return set(triggers) == set(names) and all(t["state"] == "armed" for t in triggers.values())

    site.start(reload_interval="1h", heartbeat=f"{HEARTBEAT}s")  # no state directory yet
    wait_for(lambda: site.status().get("triggers") == {}, "the first status", WAIT)
    site.apply({"a": a})
    wait_for(lambda: armed("a"), "a armed", soon)
    site.path("/srv/a/1").write_text("one")
    wait_for(lambda: (site.status()["triggers"]["a"].get("queued") == 1
                      and site.status()["triggers"]["a"]["events"] == 1), "the counts", soon)

    site.apply({"b": b})
    wait_for(lambda: armed("b"), "a removed, b armed", soon)
    shutil.rmtree(site.path(f"/{STATE}/triggers"))
    wait_for(lambda: site.status()["triggers"] == {}, "b gone with the directory", soon)
    site.apply({"a": a, "b": b})
    wait_for(lambda: armed("a", "b"), "both armed", soon)

    state = site.path(f"/{STATE}")
    state.rename(state.with_name("moved-away"))
    shutil.copytree(state.with_name("moved-away"), state, symlinks=True)
    time.sleep(HEARTBEAT + 1)  # the next heartbeat lists the new directory, and watches it
    site.apply({"b": b})
    wait_for(lambda: armed("b"), "a removed in the new state directory", soon)

    site.path("/srv/b/2").write_text("two")
    assert [r["source"]["event"]["name"] for r in site.settled_queue(2)] == ["1", "2"]
    assert site.stop() == 0


def test_an_idle_daemon_does_not_wake(site):
    """Nothing changing, the daemon's loop sleeps until the status heartbeat (30 s), whatever
    the listing interval for machines without inotify."""
    site.path("/srv/in").mkdir(parents=True)
    site.apply({"in": {"filesystem": {"path": "/srv/in", "events": ["close_write"]}}})
    site.start(reload_interval="50ms")
    site.wait_armed("in")
    time.sleep(0.5)  # the passes that the source's start and first status asked for

    def switches() -> int:
        status = Path(f"/proc/{site.daemon.pid}/task/{site.daemon.pid}/status").read_text()
        return int(status.split("voluntary_ctxt_switches:")[1].split()[0])

    before = switches()
    time.sleep(3)
    assert switches() - before <= 2, "the loop woke while nothing changed"
    assert site.status()["heartbeatSeconds"] == 30.0
    assert site.stop() == 0


def test_sigterm_queues_an_open_debounce_window_before_the_daemon_exits(site):
    site.path("/srv/in").mkdir(parents=True)
    site.apply({"batch": {"filesystem": {"path": "/srv/in", "events": ["close_write"]}, "debounce": "1h"}})
    site.start()
    site.wait_armed("batch")
    for name in ("a", "b", "c"):
        site.path(f"/srv/in/{name}").write_text(name)
    wait_for(lambda: "3 event(s) held" in site.status()["triggers"]["batch"]["detail"],
             "three events held by the debounce window", WAIT)
    assert site.queued() == []

    assert site.stop() == 0
    [run] = site.queued()
    assert run["source"]["events"] == 3
    events = json.loads(site.attachment(run["id"], "events.json"))
    assert [e["name"] for e in events["events"]] == ["a", "b", "c"]
    assert site.status() == {} or site.status().get("stoppedAt")


def test_a_broken_registration_is_reported_and_the_others_run(site):
    site.path("/srv/in").mkdir(parents=True)
    site.apply({"good": {"filesystem": {"path": "/srv/in", "events": ["close_write"]}}})
    site.path(f"/{STATE}/triggers/bad.json").write_text("{not json")
    site.start()
    triggers = site.wait_armed("good")
    wait_for(lambda: "bad" in site.status()["triggers"], "the broken registration in the status", WAIT)
    bad = site.status()["triggers"]["bad"]
    assert bad["state"] == "error" and "bad.json" in bad["detail"]
    site.path("/srv/in/f").write_text("x")
    site.settled_queue(1)
    assert triggers
    assert site.stop() == 0


def test_a_registration_edited_by_hand_is_refused_naming_its_field():
    from reconciler.triggers.filesystem import Config

    good = {"format": 1, "name": "t", "agent": "a", "task": "w", "type": "filesystem",
            "filesystem": {"path": "/srv/in"}, "policy": {}}
    for policy, field in (({"rateLimit": {"count": "x", "intervalSeconds": 60}}, "policy.rateLimit.count"),
                          ({"rateLimit": {"count": 0, "intervalSeconds": 60}}, "policy.rateLimit.count"),
                          ({"rateLimit": {"count": 1, "intervalSeconds": float("inf")}},
                           "policy.rateLimit.intervalSeconds"),
                          ({"rateLimit": {"count": 2, "intervalSeconds": "1m"}}, "policy.rateLimit.intervalSeconds"),
                          ({"debounceSeconds": "2s"}, "policy.debounceSeconds"),
                          ({"concurrency": "Sometimes"}, "policy.concurrency")):
        with pytest.raises(ValueError, match=re.escape(f"'{field}' must be")):
            Registration.from_json({**good, "policy": policy})
    # what apply writes at the schema's edges is taken: an interval of 0s, a count of 5.0
    edge = Registration.from_json({**good, "policy": {"rateLimit": {"count": 5.0, "intervalSeconds": 0}}})
    assert edge.rate_limit == (5, 0.0)
    for section, field in (({"path": "/srv/in", "settleSeconds": "abc"}, "settleSeconds"),
                           ({"path": "/srv/in", "events": "close_write"}, "events"),
                           ({"path": "/srv/in", "patterns": "*.csv"}, "patterns")):
        with pytest.raises(ValueError, match=f"^{field} must be"):
            Config.parse(section)


# -- trigger list and trigger test -------------------------------------------------------------------


def test_trigger_list_shows_each_trigger_with_the_daemons_view(site, spos):
    site.path("/srv/in").mkdir(parents=True)
    site.apply({"incoming": {"filesystem": {"path": "/srv/in", "events": ["close_write"]}},
                "off": {"filesystem": {"path": "/srv/in"}, "enabled": False}})

    stopped = spos("trigger", "list", "--root", site.root, "--json")
    assert stopped.code == 0
    listing = json.loads(stopped.out)
    assert listing["daemon"]["running"] is False
    assert [t["state"] for t in listing["triggers"]] == ["not running", "not running"]

    site.start()
    site.wait_armed("incoming")
    site.path("/srv/in/f").write_text("x")
    site.wait_queued(1)
    wait_for(lambda: site.status()["triggers"]["incoming"].get("queued") == 1, "the count", WAIT)

    listing = json.loads(spos("trigger", "list", "--root", site.root, "--json").out)
    assert listing["daemon"]["running"] is True
    incoming, off = listing["triggers"]
    assert (incoming["name"], incoming["state"], incoming["events"], incoming["queued"]) == ("incoming", "armed", 1, 1)
    assert incoming["lastRun"] == site.queued()[0]["id"] and incoming["lastFired"]
    assert (off["name"], off["state"], off["enabled"]) == ("off", "disabled", False)

    text = spos("trigger", "list", "--root", site.root).out
    assert "Trigger daemon: running" in text
    assert text.splitlines()[2].split()[:4] == ["NAME", "TYPE", "AGENT/TASK", "STATE"]
    assert text.splitlines()[3].split()[:4] == ["incoming", "filesystem", f"{AGENT}/work", "armed"]
    assert site.stop() == 0
    after = json.loads(spos("trigger", "list", "--root", site.root, "--json").out)
    assert after["daemon"]["running"] is False and "stopped" in after["daemon"]["detail"]


def test_trigger_test_queues_one_run_and_a_dry_run_none(site, spos, tmp_path):
    site.apply({"hook": {"webhook": {"path": "/h", "secretFile": "/etc/secret"}, "debounce": "1h",
                         "rateLimit": {"count": 1, "interval": "1h"}}})
    payload = tmp_path / "payload.json"
    payload.write_bytes(b'{"hello": 1}')

    dry = spos("trigger", "test", "hook", "--root", site.root, "--payload", payload, "--dry-run", "--json")
    assert dry.code == 0 and json.loads(dry.out)["status"] == "would queue"
    assert site.queued() == []

    fired = spos("trigger", "test", "hook", "--root", site.root, "--payload", payload)
    assert fired.code == 0
    [run] = site.queued()
    assert fired.out.startswith(f"Queued run {run['id']} of {AGENT}/work from trigger hook.")
    assert run["source"]["event"] == {"test": "1"}
    assert site.attachment(run["id"], "payload") == b'{"hello": 1}'

    missing = spos("trigger", "test", "nope", "--root", site.root)
    assert missing.code == 1 and "no trigger 'nope' is registered" in missing.err and "hook" in missing.err


def test_trigger_test_refuses_a_payload_its_webhook_would_refuse_and_reads_no_device(site, spos, tmp_path):
    site.apply({"hook": {"webhook": {"path": "/h", "secretFile": "/etc/secret", "maxBodySize": "100"}}})
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 101)
    over = spos("trigger", "test", "hook", "--root", site.root, "--payload", big)
    assert over.code == 1
    assert "the payload is 101 bytes; trigger hook's webhook takes at most 100" in over.err
    endless = spos("trigger", "test", "hook", "--root", site.root, "--payload", "/dev/zero", "--dry-run")
    assert endless.code == 1 and "--payload: /dev/zero: not a regular file" in endless.err
    assert site.queued() == []


# -- the gate's policy, in-process ---------------------------------------------------------------


def _gate(site, **policy) -> Gate:
    site.apply({"t": {"continuous": {"interval": "1h"}}})
    registration = Registration(name="t", agent=AGENT, task="work", type="filesystem", config={},
                                **policy)
    return Gate(Device(site.root), registration)


def test_debounce_coalesces_a_burst_into_one_run(site):
    gate = _gate(site, debounce_seconds=0.3)
    outcomes = [gate(Event({"name": str(i)}, payload=str(i).encode())).status for i in range(5)]
    assert outcomes == ["debounced"] * 5
    [run] = site.settled_queue(1)
    assert run["source"]["events"] == 5 and run["source"]["event"] == {"name": "4"}
    assert site.attachment(run["id"], "payload") == b"4"  # the last event's payload
    assert gate.counts.outcomes["debounced"] == 5 and gate.counts.outcomes["queued"] == 1


def test_rate_limit_drops_what_is_over_it(site, monkeypatch):
    """On a clock the test turns: the first four events fall in one window however long
    queueing a run takes on a busy machine."""
    now = [1000.0]
    monkeypatch.setattr(gate_module, "time", types.SimpleNamespace(time=time.time, monotonic=lambda: now[0]))
    gate = _gate(site, rate_limit=(2, 0.5))
    assert [gate(Event({})).status for _ in range(4)] == ["queued", "queued", "limited", "limited"]
    now[0] += 0.6
    assert gate(Event({})).status == "queued"
    assert len(site.queued()) == 3


def test_a_delivery_seen_before_is_not_queued_twice_even_after_a_restart(site):
    gate = _gate(site)
    assert gate(Event({}, delivery="abc")).status == "queued"
    assert gate(Event({}, delivery="abc")).status == "duplicate"
    gate.close()
    restarted = Gate(Device(site.root), gate.registration)
    assert restarted(Event({}, delivery="abc")).status == "duplicate"
    assert restarted(Event({}, delivery="def")).status == "queued"
    assert len(site.queued()) == 2


def test_forbid_queues_nothing_while_its_run_is_waiting(site):
    gate = _gate(site, concurrency="Forbid")
    first = gate(Event({}))
    second = gate(Event({}))
    assert first.status == "queued" and second.status == "skipped" and first.run in second.detail
    [run] = site.queued()
    assert run["concurrency"] == "Forbid"
    # a daemon restarted meanwhile still knows the run is its trigger's
    assert Gate(Device(site.root), gate.registration)(Event({})).status == "skipped"


def test_disabled_and_unqueueable_events_queue_nothing(site):
    assert _gate(site, enabled=False)(Event({})).status == "disabled"
    gate = _gate(site)
    shutil.rmtree(site.path(f"/{STATE}/agents/{AGENT}"))  # the agent is no longer applied
    outcome = gate(Event({}))
    assert outcome.status == "error" and "not applied" in outcome.detail
    assert gate.counts.last_error == outcome.detail


def test_a_reload_restarts_only_changed_registrations(site):
    site.path("/srv/a").mkdir(parents=True)
    site.apply({"a": {"filesystem": {"path": "/srv/a"}}, "b": {"continuous": {"interval": "1h"}}})
    daemon = TriggerDaemon(Device(site.root), listen=("127.0.0.1", 0))
    try:
        daemon.step()
        before = {name: running.source for name, running in daemon.running.items()}
        site.apply({"a": {"filesystem": {"path": "/srv/a"}}, "b": {"continuous": {"interval": "2h"}}})
        daemon.step()
        assert daemon.running["a"].source is before["a"]
        assert daemon.running["b"].source is not before["b"]
        assert daemon.running["b"].registration.config == {"intervalSeconds": 7200}
    finally:
        daemon.shutdown()


# -- what the action is told -----------------------------------------------------------------------




@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("body", [b"line one\nline two\n", b"x" * 100_000 + b"\n"],
                         ids=["in the record", "files written before the record"])
def test_the_action_reads_its_trigger_event_and_payload(site, spos, tmp_path, body):
    """A small payload travels in the queue record (one durable write per event) and the
    executor writes it out as the run starts; a large one is written into the run's tmp
    directory before the record. The action reads either the same way, and the record of the
    ended run does not keep a copy (docs/queue.md, "Attachments")."""
    if why := sandbox_missing():
        pytest.skip(why)
    script = ('echo "$SPOS_TRIGGER $SPOS_TRIGGER_TYPE $SPOS_EVENT_COUNT $SPOS_EVENT_TEST" > $SPOS_OUTPUT_DIR/env; '
              'cat "$SPOS_PAYLOAD" > $SPOS_OUTPUT_DIR/payload; cat "$SPOS_EVENTS_FILE" > $SPOS_OUTPUT_DIR/events')
    site.apply({"hook": {"webhook": {"path": "/h", "secretFile": "/etc/secret"}}},
               tasks={"work": {"command": ["/bin/sh", "-c", script]}})
    capability = {"apiVersion": "spos/v1", "kind": "Capability", "metadata": {"name": "sh"},
                  "spec": {"allowed": {"execute": ["/bin", "/usr/bin"]}}}
    manifest = site.manifests / "site.yaml"
    docs = manifest.read_text().split("\n---\n")
    agent = json.loads(docs[0])
    agent["spec"]["capability"] = "sh"
    manifest.write_text("\n---\n".join([json.dumps(capability), json.dumps(agent), *docs[1:]]))
    assert spos("apply", site.manifests, "--root", site.root, "--auto-approve",
                "--cgroup-root", tmp_path / "no-cgroups").code == 0
    payload = tmp_path / "body"
    payload.write_bytes(body)
    assert spos("trigger", "test", "hook", "--root", site.root, "--payload", payload).code == 0
    [queued] = site.queued()
    attached = site.path(f"/{STATE}/agents/{AGENT}/tmp/{queued['id']}/spos-trigger")
    inline = len(body) < 1000  # up to 16 KiB of attachments go in the record
    assert ("attachments" in queued) == inline and attached.exists() != inline

    subprocess.run([sys.executable, "-m", "reconciler", "executor", "--root", str(site.root), "--once"],
                   cwd=REPO, check=True, timeout=60, capture_output=True)

    output = site.path(f"/{STATE}/agents/{AGENT}/output")
    assert (output / "env").read_text() == "hook webhook 1 1\n"
    assert (output / "payload").read_bytes() == body
    assert json.loads((output / "events").read_text())["events"] == [{"test": "1"}]
    [ended] = site.path(f"/{STATE}/agents/{AGENT}/completed").glob("*.json")
    assert "attachments" not in json.loads(ended.read_text())


def test_a_delivery_that_could_not_be_queued_is_queued_when_the_sender_retries(site):
    gate = _gate(site)
    config = site.path(f"/{STATE}/agents/{AGENT}/agent.json")
    saved = config.read_bytes()
    config.unlink()  # queueing fails: the agent is not applied at the moment
    assert gate(Event({}, delivery="retry-me")).status == "error"
    config.write_bytes(saved)
    assert gate(Event({}, delivery="retry-me")).status == "queued"
    assert gate(Event({}, delivery="retry-me")).status == "duplicate"
    gate.close()
    assert Gate(Device(site.root), gate.registration)(Event({}, delivery="retry-me")).status == "duplicate"


def test_the_webhook_listener_is_retried_when_its_address_was_taken(site, monkeypatch):
    import socket

    from reconciler.triggers import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "SOURCE_RETRY", 0.2)
    site.path("/etc").mkdir()
    site.path("/etc/secret").write_bytes(b"x")
    site.apply({"hook": {"webhook": {"path": "/h", "secretFile": "/etc/secret"}}})
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    daemon = TriggerDaemon(Device(site.root), listen=("127.0.0.1", port))
    try:
        daemon.step()
        status = daemon.status()
        assert status["listenError"] and "cannot listen on" in status["listenError"]
        assert status["triggers"]["hook"]["state"] == "error"
        taken.close()
        wait_for(lambda: daemon.step() or daemon.status()["triggers"]["hook"]["state"] == "armed",
                 "the listener and the webhook trigger to be started again", WAIT)
        assert daemon.status()["listen"] == f"127.0.0.1:{port}"
    finally:
        taken.close()
        daemon.shutdown()


def test_trigger_test_dry_run_says_when_forbid_would_queue_nothing(site, spos):
    site.apply({"once": {"continuous": {"interval": "1h"}, "concurrency": "Forbid"}})
    assert spos("trigger", "test", "once", "--root", site.root).code == 0
    dry = spos("trigger", "test", "once", "--root", site.root, "--dry-run")
    assert dry.code == 0
    assert dry.out.startswith("Would queue nothing (a continuous trigger never overlaps its "
                              "own runs): run ")
    assert len(site.queued()) == 1
    again = spos("trigger", "test", "once", "--root", site.root)
    assert again.code == 1 and again.out.startswith("Not queued (skipped)")
    assert len(again.out.splitlines()) == 1, again.out  # no attachment of a run that is not there
