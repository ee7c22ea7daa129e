"""Network rules by destination: a run's own network namespace, one veth pair to the host, and
an nftables ruleset inside the namespace that the action cannot change.

A Capability's `network` rules decide one of three set-ups (docs/sandbox.md):

- **none** (no rule, or `none`): the run's own namespace with only its loopback.
- **host** (`any`, nothing denied): the host's network, as any service has it.
- **filtered** (anything else): the run's own namespace, linked to the host by a veth pair
  (`sposN` on the host, `eth0` inside, a /30 out of `POOL`), with an nftables table inside that
  lets out only what the rules allow, denied destinations first (denied wins), and refuses the
  rest at once (a refused connection, not a hang). The run's processes have no capabilities, so
  they cannot change the table, the addresses or the routes.

Host names (`arxiv.org`, `https://arxiv.org`, `arxiv.org:8443`) are resolved when the run starts
and their addresses allowed (or denied); a name allowed also allows DNS to the device's
nameservers. Packets leave the device the way the host routes them: beyond the device only
where it forwards IPv4 (`net.ipv4.ip_forward`) and, for the pool's private addresses to be
answered, where spos's masquerade table (`ip spos`, added on first use) applies. A filtered run
has IPv4 only; IPv6 destinations are unreachable from it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from dataclasses import dataclass

from reconciler.policy import destinations, host_rule

POOL = ipaddress.ip_network("100.80.0.0/16")
"""Addresses of the veth pairs: a /30 per run (16,384 at once), out of the shared address space
(RFC 6598), which a LAN rarely uses."""
HOST_PREFIX = "spos"
_SLOTS = POOL.num_addresses // 4
_TIMEOUT = 10


class NetworkError(Exception):
    """The run's network could not be set up."""


@dataclass(frozen=True)
class Egress:
    """Where a run in a filtered namespace may connect, addresses resolved. Each destination is
    (network text, port or None); `allow_any` lets out everything not denied."""

    allow_any: bool
    allow: tuple[tuple[str, int | None], ...]
    deny: tuple[tuple[str, int | None], ...]
    notes: tuple[str, ...] = ()


def setup_for(allowed: list[str] | None, denied: list[str] | None, resolve=None) -> tuple[bool, Egress | None]:
    """(host network?, egress rules or None) for a Capability's network rules. Resolves host
    names with `resolve(name) -> [address text]` (default: the system resolver)."""
    allowed, denied = list(allowed or []), list(denied or [])
    if not allowed or "none" in allowed:
        return False, None
    if not denied and set(allowed) <= {"any", "loopback"} and "any" in allowed:
        return True, None
    resolve = resolve or _resolve
    notes: list[str] = []
    allow, deny = [], []
    names_allowed = False
    for rules, into, side in ((allowed, allow, "allowed"), (denied, deny, "denied")):
        for rule in rules:
            if rule in ("any", "loopback"):
                continue
            named = host_rule(rule)
            if named is None:
                into.extend((str(net), port) for net, port in destinations(rule) if net.version == 4)
                continue
            host, port = named
            if host == "*":
                into.append(("0.0.0.0/0", port))
                continue
            addresses = [a for a in resolve(host) if ipaddress.ip_address(a).version == 4]
            if not addresses:
                notes.append(f"{side} host {host} did not resolve to an IPv4 address")
            into.extend((f"{a}/32", port) for a in sorted(set(addresses)))
            names_allowed |= side == "allowed"
    if names_allowed:
        allow.extend((f"{server}/32", 53) for server in nameservers())
    return False, Egress("any" in allowed, tuple(allow), tuple(deny), tuple(notes))


def ruleset(egress: Egress) -> str:
    """The nftables table of one run's namespace, as `nft -f` reads it. Pure."""
    def matches(network: str, port: int | None) -> str:
        address = "" if network == "0.0.0.0/0" else f"ip daddr {network} "
        return f"meta nfproto ipv4 {address}" + (f"meta l4proto {{ tcp, udp }} th dport {port} " if port else "")

    lines = [
        "table inet spos_run {",
        "  chain output {",
        "    type filter hook output priority 0; policy drop;",
        '    oif "lo" accept',
        "    ct state established,related accept",
    ]
    lines += [f"    {matches(net, port)}reject with icmpx type admin-prohibited"
              for net, port in egress.deny]
    lines += [f"    {matches(net, port)}accept" for net, port in egress.allow]
    if egress.allow_any:
        lines.append("    meta nfproto ipv4 accept")
    lines += [
        "    reject with icmpx type admin-prohibited",
        "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        '    iif "lo" accept',
        "    ct state established,related accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class Link:
    """The veth pair of one run, set up once its namespace exists (`attach`), and removed by
    `release` when the run has ended.

    The link holds the namespace open (a file descriptor of it) until `release`, so that the
    host end, and its byte counters, outlive the run's last process until the executor has read
    them (`traffic`). An executor that dies lets go of the namespace with its other
    descriptors, and the kernel removes the pair with it."""

    def __init__(self, slot: int):
        self.slot = slot
        base = POOL.network_address + 4 * slot
        self.interface = f"{HOST_PREFIX}{slot}"
        self.gateway, self.address = base + 1, base + 2
        self.netns_fd = -1

    def traffic(self) -> dict:
        """{"networkSentBytes", "networkReceivedBytes"} of the run so far: what the host end
        received from it and sent to it (None each when the counters cannot be read)."""
        counters = {}
        for key, counter in (("networkSentBytes", "rx_bytes"), ("networkReceivedBytes", "tx_bytes")):
            try:
                with open(f"/sys/class/net/{self.interface}/statistics/{counter}") as handle:
                    counters[key] = int(handle.read())
            except (OSError, ValueError):
                counters[key] = None
        return counters

    def release(self) -> None:
        """Remove the pair and let the namespace go, once the run's processes are gone. The pair
        is deleted at once rather than left to the kernel, which frees a namespace in the
        background: the host keeps no interface of a run that has ended."""
        if self.netns_fd >= 0:
            _run(["ip", "link", "del", self.interface], check=False)
            os.close(self.netns_fd)
            self.netns_fd = -1

    @classmethod
    def attach(cls, pid: int, egress: Egress, first_slot: int = 0) -> "Link":
        """Link the network namespace of `pid` to the host and load its ruleset. A slot is
        taken by creating its host interface: the kernel refuses a name in use, so two
        executors never share one, and a slot frees itself when its namespace dies."""
        netns = f"/proc/{pid}/ns/net"
        held = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            link = cls._linked(pid, netns, egress, first_slot)
        except BaseException:
            os.close(held)
            raise
        link.netns_fd = held
        return link

    @classmethod
    def _linked(cls, pid: int, netns: str, egress: Egress, first_slot: int) -> "Link":
        for offset in range(_SLOTS):
            link = cls((first_slot + offset) % _SLOTS)
            created = _run(["ip", "link", "add", link.interface, "type", "veth",
                            "peer", "name", "eth0", "netns", str(pid)], check=False)
            if created.returncode == 0:
                break
            if "File exists" not in created.stderr:
                raise NetworkError(f"cannot create the run's network link: {created.stderr.strip()}")
        else:
            raise NetworkError(f"every address of {POOL} is in use")
        _run(["ip", "-batch", "-"], stdin=(
            f"addr add {link.gateway}/30 dev {link.interface}\n"
            f"link set {link.interface} up\n"
        ))
        inside = ["nsenter", f"--net={netns}", "--"]
        _run([*inside, "ip", "-batch", "-"], stdin=(
            f"addr add {link.address}/30 dev eth0\n"
            "link set lo up\n"
            "link set eth0 up\n"
            f"route add default via {link.gateway}\n"
        ))
        _run([*inside, "nft", "-f", "-"], stdin=ruleset(egress))
        _masquerade()
        return link


def nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """The IPv4 nameservers the run will use (it sees the host's resolv.conf)."""
    found = []
    try:
        with open(path) as handle:
            for line in handle:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        if ipaddress.ip_address(words[1]).version == 4:
                            found.append(words[1])
                    except ValueError:
                        continue
    except OSError:
        pass
    return found


def info_pid(info_fd: int) -> int:
    """The pid of the sandbox's first process, from bubblewrap's `--info-fd` JSON."""
    data = b""
    while not data.rstrip().endswith(b"}"):
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError) as exc:
        raise NetworkError(f"bubblewrap did not say where the run is: {data[:200]!r}") from exc


_masquerading = False


def _masquerade() -> None:
    """Answers to the pool's private addresses must find their way back: masquerade what leaves
    the device from the pool. Added once, when missing; only this table is spos's."""
    global _masquerading
    if _masquerading:
        return
    if _run(["nft", "list", "table", "ip", "spos"], check=False).returncode != 0:
        _run(["nft", "-f", "-"], stdin=(
            "table ip spos {\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    ip saddr {POOL} oifname != "{HOST_PREFIX}*" masquerade\n'
            "  }\n"
            "}\n"
        ))
    _masquerading = True


def _resolve(host: str) -> list[str]:
    try:
        return [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except OSError:
        return []


def _run(argv: list[str], stdin: str = "", check: bool = True):
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{argv[0]}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])}: {done.stderr.strip()}")
    return done
