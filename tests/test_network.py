"""Network rules by destination, enforced in the run's own network namespace (network.py).

The decision from a Capability's rules and the nftables table are checked as pure functions;
the promises are checked from inside real sandboxes: two listeners on documentation addresses
(198.51.100.7 and .8, added to the host's loopback interface for the module) stand in for
destinations on the network, and each test asserts which of them a run could connect to.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from sandboxes import reap_cgroups

from reconciler.executor.network import Egress, ruleset, setup_for
from reconciler.executor.sandbox import Sandbox, SandboxSpec

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = f"spos-net-test-{os.getpid()}"
PYTHON = "/usr/bin/python3"
NFT = shutil.which("nft") or "/usr/sbin/nft"
ALLOWED_HOST, OTHER_HOST = "198.51.100.7", "198.51.100.8"
WAIT_SECONDS = 20


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and nftables need root"
    for tool in ("bwrap", "nft", "ip", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    ready, why = Sandbox(cgroup_root=str(CGROUP_ROOT)).available()
    return None if ready else why


# --- the decision and the table: pure --------------------------------------------------------

def test_the_rules_decide_the_set_up():
    assert setup_for([], []) == (False, None)
    assert setup_for(["none"], []) == (False, None)
    assert setup_for(["any"], []) == (True, None)
    assert setup_for(["any", "loopback"], []) == (True, None)
    host, egress = setup_for(["any"], ["10.0.0.0/8", "*:22"])
    assert not host and egress.allow_any
    assert egress.deny == (("10.0.0.0/8", None), ("0.0.0.0/0", 22))
    host, egress = setup_for(["loopback", "10.20.0.5/32:443"], [])
    assert not host and not egress.allow_any and egress.allow == (("10.20.0.5/32", 443),)


def test_host_names_resolve_when_the_run_starts_and_bring_dns_along(tmp_path, monkeypatch):
    import reconciler.executor.network as network

    monkeypatch.setattr(network, "nameservers", lambda: ["192.0.2.53"])
    seen = []

    def resolve(name):
        seen.append(name)
        return {"arxiv.org": ["151.101.3.42", "2a04:4e42::0"], "bad.example": []}.get(name, [])

    _, egress = setup_for(["https://arxiv.org"], ["bad.example"], resolve=resolve)
    assert seen == ["arxiv.org", "bad.example"]
    assert egress.allow == (("151.101.3.42/32", 443), ("192.0.2.53/32", 53))
    assert egress.notes == ("denied host bad.example did not resolve to an IPv4 address",)


def test_denied_destinations_come_before_allowed_ones_and_the_rest_is_refused():
    table = ruleset(Egress(True, (("10.20.0.5/32", 443),), (("10.0.0.0/8", None), ("0.0.0.0/0", 22))))
    lines = [line.strip() for line in table.splitlines()]
    deny = lines.index("meta nfproto ipv4 ip daddr 10.0.0.0/8 reject with icmpx type admin-prohibited")
    port = lines.index("meta nfproto ipv4 meta l4proto { tcp, udp } th dport 22 reject with icmpx "
                       "type admin-prohibited")
    allow = lines.index("meta nfproto ipv4 ip daddr 10.20.0.5/32 meta l4proto { tcp, udp } th dport "
                        "443 accept")
    anything = lines.index("meta nfproto ipv4 accept")
    refuse = lines.index("reject with icmpx type admin-prohibited")
    assert deny < port < allow < anything < refuse
    assert "type filter hook output priority 0; policy drop;" in lines


# --- the promises, from inside real sandboxes ------------------------------------------------

needs_root = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "")


@pytest.fixture(scope="module")
def destinations():
    """Listeners on two addresses of the host, each on two ports: {(address, name): port}."""
    added = []
    for address in (ALLOWED_HOST, OTHER_HOST):
        done = subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], capture_output=True)
        if done.returncode == 0:
            added.append(address)
    listeners, ports = [], {}
    stop = threading.Event()
    for address in (ALLOWED_HOST, OTHER_HOST, "127.0.0.1"):
        for name in ("a", "b"):
            listener = socket.create_server((address, 0))
            listener.settimeout(0.2)
            listeners.append(listener)
            ports[(address, name)] = listener.getsockname()[1]

    def serve(listener):
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connection.close()

    threads = [threading.Thread(target=serve, args=(listener,), daemon=True) for listener in listeners]
    for thread in threads:
        thread.start()
    yield ports
    stop.set()
    for thread in threads:
        thread.join(timeout=2)
    for listener in listeners:
        listener.close()
    for address in added:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], capture_output=True)


@pytest.fixture(scope="module", autouse=True)
def _cgroups():
    yield
    if _why_not():
        return
    reap_cgroups(PARENT, str(CGROUP_ROOT))


def probe(tmp_path, egress: Egress | None, targets, *, host_network=False, extra=()):
    """Run a sandboxed action that tries each (address, port) and prints `ok` or the error."""
    code = (
        "import socket, subprocess, sys\n"
        f"for address, port in {list(targets)!r}:\n"
        "    try:\n"
        "        socket.create_connection((address, port), timeout=3).close()\n"
        "        print(address, port, 'ok')\n"
        "    except OSError as exc:\n"
        "        print(address, port, 'refused', exc.errno)\n"
        f"for argv in {list(extra)!r}:\n"
        "    done = subprocess.run(argv, capture_output=True, text=True)\n"
        "    print('command', done.returncode, done.stderr.strip()[:200])\n"
    )
    root = tmp_path / "device"
    root.mkdir(exist_ok=True)
    read, write = os.pipe()
    run = Sandbox(root=str(root), cgroup_root=str(CGROUP_ROOT)).spawn(
        SandboxSpec(argv=[PYTHON, "-c", code], env={}, execute=(PYTHON, NFT, "/usr/sbin/ip", "/usr/bin/ip"),
                    network=host_network, egress=egress,
                    cgroup_name=f"{PARENT}/{uuid.uuid4().hex[:12]}"),
        stdout=write, stderr=write)
    os.close(write)
    try:
        run.wait(WAIT_SECONDS)
        output = b""
        while chunk := os.read(read, 65536):
            output += chunk
    finally:
        os.close(read)
        run.cleanup()
    assert run.setup_error() is None
    return output.decode()


def reached(output: str) -> set[tuple[str, int]]:
    return {(w[0], int(w[1])) for w in map(str.split, output.splitlines()) if len(w) >= 3 and w[2] == "ok"}


@needs_root
def test_a_run_reaches_only_its_allowed_destination(tmp_path, destinations):
    a, b = destinations[(ALLOWED_HOST, "a")], destinations[(ALLOWED_HOST, "b")]
    other = destinations[(OTHER_HOST, "a")]
    _, egress = setup_for([f"{ALLOWED_HOST}/32:{a}"], [])
    output = probe(tmp_path, egress, [(ALLOWED_HOST, a), (ALLOWED_HOST, b), (OTHER_HOST, other)])
    assert reached(output) == {(ALLOWED_HOST, a)}
    assert "refused 113" in output  # refused at once (no route to host), not left to time out


@needs_root
def test_denied_wins_over_any(tmp_path, destinations):
    a, other = destinations[(ALLOWED_HOST, "a")], destinations[(OTHER_HOST, "a")]
    _, egress = setup_for(["any"], [f"{OTHER_HOST}/32"])
    output = probe(tmp_path, egress, [(ALLOWED_HOST, a), (OTHER_HOST, other)])
    assert reached(output) == {(ALLOWED_HOST, a)}


@needs_root
def test_a_port_rule_applies_to_every_address(tmp_path, destinations):
    a, b = destinations[(ALLOWED_HOST, "a")], destinations[(ALLOWED_HOST, "b")]
    _, egress = setup_for(["any"], [f"*:{b}"])
    output = probe(tmp_path, egress, [(ALLOWED_HOST, a), (ALLOWED_HOST, b)])
    assert reached(output) == {(ALLOWED_HOST, a)}


@needs_root
def test_a_host_name_is_allowed_by_its_addresses(tmp_path, destinations):
    a, other = destinations[(ALLOWED_HOST, "a")], destinations[(OTHER_HOST, "a")]
    _, egress = setup_for([f"collector.example.test:{a}"], [],
                          resolve=lambda name: [ALLOWED_HOST] if name == "collector.example.test" else [])
    output = probe(tmp_path, egress, [(ALLOWED_HOST, a), (OTHER_HOST, other)])
    assert reached(output) == {(ALLOWED_HOST, a)}


@needs_root
def test_the_hosts_loopback_services_stay_out_of_reach(tmp_path, destinations):
    local = destinations[("127.0.0.1", "a")]
    _, egress = setup_for(["any"], ["10.0.0.0/8"])
    assert reached(probe(tmp_path, egress, [("127.0.0.1", local)])) == set()


@needs_root
def test_the_action_cannot_change_its_rules(tmp_path, destinations):
    other = destinations[(OTHER_HOST, "a")]
    _, egress = setup_for([f"{ALLOWED_HOST}/32"], [])
    output = probe(tmp_path, egress, [(OTHER_HOST, other)], extra=[
        [NFT, "flush", "ruleset"],
        ["/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "/usr/bin/ip",
         "route", "add", f"{OTHER_HOST}/32", "dev", "lo"],
    ])
    commands = [line for line in output.splitlines() if line.startswith("command")]
    assert len(commands) == 2 and all(not line.startswith("command 0") for line in commands), output
    assert reached(output) == set()


@needs_root
def test_nothing_of_a_run_network_is_left_on_the_host(tmp_path, destinations):
    def run_links() -> set[str]:
        shown = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        return {line.split(": ")[1] for line in shown.splitlines() if ": spos" in line}

    before = run_links()  # other runs on this machine may hold links of their own
    _, egress = setup_for([f"{ALLOWED_HOST}/32"], [])
    probe(tmp_path, egress, [])
    assert run_links() <= before


@needs_root
def test_a_filtered_run_counts_the_bytes_it_sent_and_received(tmp_path, destinations):
    sink = socket.create_server((ALLOWED_HOST, 0))
    sink.settimeout(WAIT_SECONDS)
    port = sink.getsockname()[1]
    got = []

    def drain():  # take what the run sends, answer with 50,000 bytes
        connection, _ = sink.accept()
        with connection:
            connection.settimeout(WAIT_SECONDS)
            data = b""
            while len(data) < 200_000 and (chunk := connection.recv(65536)):
                data += chunk
            got.append(len(data))
            connection.sendall(b"y" * 50_000)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    code = ("import socket\n"
            f"s = socket.create_connection(({ALLOWED_HOST!r}, {port}), timeout=10)\n"
            "s.sendall(b'x' * 200_000)\n"
            "n = 0\n"
            "while n < 50_000 and (chunk := s.recv(65536)):\n"
            "    n += len(chunk)\n"
            "s.close()\n")
    _, egress = setup_for([f"{ALLOWED_HOST}/32:{port}"], [])
    root = tmp_path / "device"
    root.mkdir()
    run = Sandbox(root=str(root), cgroup_root=str(CGROUP_ROOT)).spawn(
        SandboxSpec(argv=[PYTHON, "-c", code], env={}, execute=(PYTHON,), network=False, egress=egress,
                    cgroup_name=f"{PARENT}/{uuid.uuid4().hex[:12]}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert run.wait(WAIT_SECONDS) == 0
        thread.join(WAIT_SECONDS)
        usage = run.usage()  # after the run's last process is gone: the link is still held
    finally:
        run.cleanup()
        sink.close()

    assert got == [200_000]
    # the payload plus TCP/IP headers, ARP and the handshake; not much more
    assert 200_000 < usage["networkSentBytes"] < 230_000
    assert 50_000 < usage["networkReceivedBytes"] < 60_000


@needs_root
def test_a_run_without_network_sent_nothing_and_one_on_the_host_network_is_not_counted(tmp_path):
    root = tmp_path / "device"
    root.mkdir()
    for host_network, expected in ((False, 0), (True, None)):
        run = Sandbox(root=str(root), cgroup_root=str(CGROUP_ROOT)).spawn(
            SandboxSpec(argv=["/bin/true"], env={}, execute=("/bin/true",), network=host_network,
                        cgroup_name=f"{PARENT}/{uuid.uuid4().hex[:12]}"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run.wait(WAIT_SECONDS)
            usage = run.usage()
        finally:
            run.cleanup()
        assert (usage["networkSentBytes"], usage["networkReceivedBytes"]) == (expected, expected)
