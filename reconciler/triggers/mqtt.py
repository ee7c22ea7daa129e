"""MQTT triggers: each message a broker delivers for a topic filter becomes an event.

The registration's `mqtt` section: `host`, `port` (default 1883, 8883 with TLS), `tls`
(checked against the system's certificate authorities), `topic` (a filter: `+` matches one
level, `#` the rest), `qos` (0, 1 or 2; default 0), `clientId` (default: the broker assigns
one), `username`, `passwordFile` (a device path; the password is read from it on every
connect and never shown) and `keepaliveSeconds` (default 60).

Each message fires with data `{"topic": <its topic>, "qos": <the qos it was delivered with>,
"retained": "1" | "0"}` and the message's bytes as payload.

The source keeps its own connection loop on one thread. It subscribes on every successful
connect, so a reconnect resubscribes; while the broker is unreachable or refuses it, the status
is `waiting` (or `error` for a refusal or an unreadable password file) and it tries again after
RECONNECT_MIN_SECONDS, doubling up to RECONNECT_MAX_SECONDS and back to the minimum once a
subscription has lasted STABLE_SECONDS. A topic filter MQTT does not allow (`a/#/b`) is an
error status, not retried. The session is clean: messages published while the source is disconnected are not
delivered later (retained ones are, as for any new subscription).
"""

from __future__ import annotations

import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from reconciler.triggers.base import Context, Emit, Event, Registration, Stoppable

RECONNECT_MIN_SECONDS = 1.0
"""The first wait before connecting again; read at each retry, so tests may lower it."""
RECONNECT_MAX_SECONDS = 60.0
STABLE_SECONDS = 10.0
"""How long a subscription must last before the backoff starts again from the shortest delay:
a broker that accepts and drops at once (another client with the same id, a session taken
over) is retried with backoff like one that refuses."""
"""The longest wait between connection attempts."""
LOOP_TIMEOUT_SECONDS = 0.2
"""The longest the network loop waits for traffic; bounds how long `stop()` goes unnoticed."""
CONNECT_TIMEOUT_SECONDS = 5.0
"""How long one attempt to reach the broker (TCP and TLS) may take."""
STOP_JOIN_SECONDS = 1.0
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_KEEPALIVE_SECONDS = 60


class PasswordUnreadable(Exception):
    """The password file could not be read; the message names the file, never its content."""


class MqttSource(Stoppable):
    """Subscribes to one topic filter on one broker and emits every message it delivers."""

    def __init__(self, registration: Registration, emit: Emit, context: Context):
        super().__init__()
        config = registration.config
        self.name = registration.name
        self.emit = emit
        self.host = config["host"]
        self.tls = bool(config.get("tls"))
        self.port = int(config.get("port") or (DEFAULT_TLS_PORT if self.tls else DEFAULT_PORT))
        self.topic = config["topic"]
        self.qos = int(config.get("qos") or 0)
        self.client_id = config.get("clientId") or ""
        self.username = config.get("username")
        self.password_file = config.get("passwordFile")
        self.password_path = context.host(self.password_file) if self.password_file else None
        self.keepalive = _whole_seconds(config.get("keepaliveSeconds"), DEFAULT_KEEPALIVE_SECONDS)
        self._connected = False
        self._armed_at: float | None = None  # when the subscription was acknowledged
        self._unusable = False
        self._refusal = ""
        self.set_status("waiting", f"not connected to {self.broker} yet")

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Starts connecting and receiving on a daemon thread."""
        self.start_thread(f"trigger-mqtt-{self.name}")

    def stop(self) -> None:
        """Disconnects from the broker and ends the thread, within about a second (a connect
        attempt in progress ends within CONNECT_TIMEOUT_SECONDS). Idempotent."""
        self.stop_thread(STOP_JOIN_SECONDS)

    def _run(self) -> None:
        """Connects, receives until the connection is lost, and retries with backoff; the
        client (and its sockets) lives only on this thread."""
        client = self._new_client()
        delay = RECONNECT_MIN_SECONDS
        try:
            while not self.stopping.is_set():
                self._session(client)
                if self._unusable:  # the topic filter: no retry would do better
                    break
                if self._armed_at is not None and time.monotonic() - self._armed_at >= STABLE_SECONDS:
                    delay = RECONNECT_MIN_SECONDS
                if self.wait(delay):
                    break
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        finally:
            client.disconnect()

    def _new_client(self) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True)
        client.connect_timeout = CONNECT_TIMEOUT_SECONDS
        if self.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _session(self, client: paho.Client) -> None:
        """One connection: from connecting until it is lost or the source stops. Never raises;
        the status says how it ended."""
        self._connected = False
        self._armed_at = None
        self._refusal = ""
        try:
            self._log_in(client)
            client.connect(self.host, self.port, self.keepalive)
        except PasswordUnreadable as error:
            self.set_status("error", str(error))
            return
        except (OSError, ValueError) as error:
            self.set_status("waiting", f"broker {self.broker} unreachable: {error}")
            return
        try:
            self._loop_until_lost(client)
        except Exception as error:  # a failing callback must not end the source's thread
            self.set_status("error", f"connection to {self.broker} failed: {error!r}")

    def _loop_until_lost(self, client: paho.Client) -> None:
        while not self.stopping.is_set():
            result = client.loop(LOOP_TIMEOUT_SECONDS)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._show_lost(result)
                return

    def _show_lost(self, result: MQTTErrorCode) -> None:
        if self._unusable:  # it said why itself
            return
        if self._refusal:
            self.set_status("error", f"broker {self.broker} refused the connection: {self._refusal}")
        else:
            self.set_status("waiting", f"broker {self.broker} unreachable: {paho.error_string(result).rstrip('.')}")

    def _log_in(self, client: paho.Client) -> None:
        """Sets the credentials of the next connect, the password read fresh from its file."""
        if self.username is None and self.password_path is None:
            return
        client.username_pw_set(self.username or "", self._read_password())

    def _read_password(self) -> str | None:
        if self.password_path is None:
            return None
        try:
            with open(self.password_path, encoding="utf-8") as handle:
                return handle.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            reason = (error.strerror or str(error)) if isinstance(error, OSError) else "not UTF-8 text"
            raise PasswordUnreadable(f"passwordFile {self.password_file} cannot be read: {reason}") from None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            return
        self._connected = True
        self.set_status("waiting", f"subscribing to {self.topic} at {self.broker}")
        try:
            client.subscribe(self.topic, self.qos)
        except ValueError as error:  # a filter MQTT does not allow, such as a/#/b
            self._unusable = True
            self.set_status("error", f"topic filter {self.topic!r} cannot be subscribed to: {error}")
            client.disconnect()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            self.set_status("error", f"broker {self.broker} refused the subscription to {self.topic}: {refused[0]}")
        else:
            self._armed_at = time.monotonic()
            self.set_status("armed", f"subscribed to {self.topic} at {self.broker}")

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        data = {"topic": _topic(message), "qos": str(message.qos), "retained": "1" if message.retain else "0"}
        self.emit(Event(data=data, payload=bytes(message.payload)))


def _topic(message: "paho.MQTTMessage") -> str:
    """The message's topic; one that is not UTF-8 (a lenient broker may pass it on) has its
    bad bytes replaced rather than ending the session, as paho's own decoding would."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return bytes(message._topic).decode("utf-8", errors="replace")


def _whole_seconds(seconds: float | None, default: int) -> int:
    """MQTT counts the keepalive in whole seconds; a shorter one is rounded up to one."""
    return default if seconds is None else max(1, round(float(seconds)))


def open_source(registration: Registration, emit: Emit, context: Context) -> MqttSource:
    """The MQTT source for `registration`, built but not started."""
    return MqttSource(registration, emit, context)
