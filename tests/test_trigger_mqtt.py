"""MQTT triggers against a real mosquitto on a private loopback port: messages fire with their
exact topic and payload, only for topics the filter matches; a broker that goes away is waited
for and the subscription comes back with it; credentials come from the password file."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from reconciler.triggers import mqtt as mqtt_trigger
from reconciler.triggers.base import Context, Event, Outcome, Registration
from waiting import wait_for

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

pytestmark = pytest.mark.skipif(
    not MOSQUITTO.exists(), reason="mosquitto is not installed (apt-get install mosquitto)")


class Recorder:
    """A stand-in for the gate: keeps every event it is handed."""

    def __init__(self):
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> Outcome:
        with self._lock:
            self.events.append(event)
        return Outcome("queued", run="run-1")

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def topics(self) -> list[str]:
        return [event.data["topic"] for event in self.snapshot()]


class Broker:
    """A mosquitto of this test's own on 127.0.0.1:`port`, startable again on the same port."""

    def __init__(self, directory: Path, port: int, extra_config: str = ""):
        self.port = port
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {port} 127.0.0.1\n"
            "persistence false\n"
            "log_dest stderr\n"
            "user root\n"
            + (extra_config or "allow_anonymous true\n")
        )
        self.log = directory / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._accepting, f"mosquitto to listen on port {self.port}", 5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def _accepting(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"mosquitto exited: {self.log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch):
    monkeypatch.setattr(mqtt_trigger, "RECONNECT_MIN_SECONDS", 0.1)
    monkeypatch.setattr(mqtt_trigger, "RECONNECT_MAX_SECONDS", 0.3)


@pytest.fixture
def make_broker(tmp_path):
    """Builds brokers (not started); every one is killed at teardown."""
    brokers = []

    def make(extra_config: str = "") -> Broker:
        directory = tmp_path / f"broker-{len(brokers)}"
        directory.mkdir()
        broker = Broker(directory, free_port(), extra_config)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def broker(make_broker) -> Broker:
    running = make_broker()
    running.start()
    return running


@pytest.fixture
def device_root(tmp_path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def start_source(device_root):
    """Builds and starts an MQTT source with the given config; stops it after."""
    sources = []

    def start(port: int, **config):
        recorder = Recorder()
        registration = Registration(
            name="site-alarms", agent="site-agent", task="on_alarm", type="mqtt",
            config={"host": "127.0.0.1", "port": port, "tls": False, "keepaliveSeconds": 60, **config},
        )
        context = Context(host=lambda path: str(device_root / path.lstrip("/")))
        source = mqtt_trigger.open_source(registration, recorder, context)
        sources.append(source)
        source.start()
        return source, recorder

    yield start
    for source in sources:
        source.stop()


@pytest.fixture
def publish(broker):
    """Publishes over one connection, in order, each call returning once the broker has it."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()

    def send(topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False) -> None:
        client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(3)

    yield send
    client.disconnect()
    client.loop_stop()


def armed(source) -> bool:
    return source.status().state == "armed"


def last_topic_is(recorder: Recorder, topic: str):
    return lambda: recorder.topics()[-1:] == [topic] and recorder.snapshot()


def test_a_message_fires_with_its_exact_topic_and_payload(broker, start_source, publish):
    source, recorder = start_source(broker.port, topic="site/+/alarm", qos=0)
    wait_for(lambda: armed(source), "the source to subscribe", 5)

    publish("site/north/alarm", b"\x00smoke \xff")

    [event] = wait_for(last_topic_is(recorder, "site/north/alarm"), "the message", 3)
    assert event.data == {"topic": "site/north/alarm", "qos": "0", "retained": "0"}
    assert event.payload == b"\x00smoke \xff"


WILDCARDS = {
    "plus matches one level": (
        "site/+/alarm", ["site/north/alarm", "site/south/alarm"],
        ["site/alarm", "site/north/east/alarm", "other/north/alarm", "site/north/alarms"]),
    "hash matches the rest, the parent level included": (
        "sensors/#", ["sensors", "sensors/t", "sensors/hall/t"],
        ["sensor/t", "x/sensors/t"]),
}


@pytest.mark.parametrize("topic_filter, matching, other", WILDCARDS.values(), ids=WILDCARDS.keys())
def test_only_topics_the_filter_matches_fire(broker, start_source, publish, topic_filter, matching, other):
    source, recorder = start_source(broker.port, topic=topic_filter)
    wait_for(lambda: armed(source), "the source to subscribe", 5)

    for topic in [*other, *matching]:
        publish(topic, topic.encode())

    events = wait_for(last_topic_is(recorder, matching[-1]), f"a message on {matching[-1]}", 3)
    assert [(e.data["topic"], e.payload) for e in events] == [(t, t.encode()) for t in matching]


def test_a_qos_1_message_arrives_with_qos_1(broker, start_source, publish):
    source, recorder = start_source(broker.port, topic="site/+/alarm", qos=1)
    wait_for(lambda: armed(source), "the source to subscribe", 5)

    publish("site/north/alarm", b"door", qos=1)

    [event] = wait_for(last_topic_is(recorder, "site/north/alarm"), "the message", 3)
    assert event.data["qos"] == "1"
    assert event.payload == b"door"


def test_a_retained_message_fires_on_subscribing_marked_retained(broker, start_source, publish):
    publish("site/north/alarm", b"last known", retain=True)

    source, recorder = start_source(broker.port, topic="site/+/alarm")

    [event] = wait_for(last_topic_is(recorder, "site/north/alarm"), "the retained message", 5)
    assert event.data["retained"] == "1"
    assert event.payload == b"last known"


def test_a_broker_that_comes_back_is_subscribed_to_again(broker, start_source):
    source, recorder = start_source(broker.port, topic="site/+/alarm")
    wait_for(lambda: armed(source), "the source to subscribe", 5)

    broker.kill()
    wait_for(lambda: source.status().state == "waiting", "status waiting after the broker died", 3)
    assert f"broker 127.0.0.1:{broker.port} unreachable" in source.status().detail

    broker.start()
    wait_for(lambda: armed(source), "the source to resubscribe", 5)
    paho_publish(broker.port, "site/north/alarm", b"after restart")

    [event] = wait_for(last_topic_is(recorder, "site/north/alarm"), "a message after the restart", 3)
    assert event.payload == b"after restart"


def test_a_broker_absent_at_start_is_waited_for(make_broker, start_source):
    broker = make_broker()
    source, _ = start_source(broker.port, topic="site/+/alarm")
    wait_for(lambda: "unreachable" in source.status().detail, "status saying the broker is unreachable", 3)
    assert source.status().state == "waiting"
    assert "Connection refused" in source.status().detail

    broker.start()

    wait_for(lambda: armed(source), "the source to subscribe once the broker is up", 5)


def test_stop_disconnects_from_the_broker(broker, start_source):
    source, _ = start_source(broker.port, topic="site/+/alarm")
    wait_for(lambda: armed(source), "the source to subscribe", 5)
    assert connections_to(broker.port)

    source.stop()
    source.stop()

    assert not connections_to(broker.port)


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_the_password_comes_from_the_password_file_and_is_never_shown(
        make_broker, start_source, device_root, tmp_path):
    password_db = tmp_path / "passwords"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(password_db), "sensor", "s3cret-pw"], check=True)
    broker = make_broker(f"allow_anonymous false\npassword_file {password_db}\n")
    broker.start()
    secrets = device_root / "etc/spos"
    secrets.mkdir(parents=True)
    (secrets / "mqtt-good").write_text("s3cret-pw\n")
    (secrets / "mqtt-bad").write_text("wrong-pw-value\n")

    good, _ = start_source(broker.port, topic="a/#", username="sensor", passwordFile="/etc/spos/mqtt-good")
    bad, _ = start_source(broker.port, topic="a/#", username="sensor", passwordFile="/etc/spos/mqtt-bad")

    wait_for(lambda: armed(good), "the source with the right password to subscribe", 5)
    wait_for(lambda: bad.status().state == "error", "the source with a wrong password to be refused", 5)
    assert "refused" in bad.status().detail
    assert "wrong-pw-value" not in bad.status().detail


def test_an_unreadable_password_file_is_an_error_naming_the_file(broker, start_source):
    source, _ = start_source(broker.port, topic="a/#", username="sensor", passwordFile="/etc/spos/missing")

    wait_for(lambda: source.status().state == "error", "status error for the missing password file", 3)
    assert "/etc/spos/missing" in source.status().detail


def paho_publish(port: int, topic: str, payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload).wait_for_publish(3)
    finally:
        client.disconnect()
        client.loop_stop()


def connections_to(port: int) -> list:
    return [c for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port]


def _counting_sessions(monkeypatch) -> list[float]:
    """When each connection of any MQTT source began."""
    began: list[float] = []
    session = mqtt_trigger.MqttSource._session

    def counted(self, client):
        began.append(time.monotonic())
        return session(self, client)

    monkeypatch.setattr(mqtt_trigger.MqttSource, "_session", counted)
    return began


def test_a_topic_filter_mqtt_does_not_allow_is_an_error_and_not_retried(
        broker, start_source, monkeypatch):
    began = _counting_sessions(monkeypatch)
    source, _ = start_source(broker.port, topic="alarms/#/zone")
    wait_for(lambda: source.status().state == "error", "the error status", 5)
    assert "cannot be subscribed to" in source.status().detail
    time.sleep(1.0)  # three reconnects' worth at the quick delays of these tests
    assert len(began) == 1 and source.status().state == "error"


def test_a_connection_dropped_at_once_is_retried_with_growing_delays(
        broker, start_source, monkeypatch):
    """Two clients with one client id take the session from each other as soon as each has
    it: the delay grows as for a broker that refuses, and does not start again from the
    shortest each time the broker accepts."""
    monkeypatch.setattr(mqtt_trigger, "RECONNECT_MAX_SECONDS", 1.0)
    began = _counting_sessions(monkeypatch)
    start_source(broker.port, topic="alarms/#", clientId="one-device")
    start_source(broker.port, topic="alarms/#", clientId="one-device")
    time.sleep(3.0)
    assert 2 <= len(began) <= 14, f"{len(began)} connections in 3 s"
