"""Policies: every rule, each violation reported at the offending field, naming the policy.

A small compliant project (one Capability, Quota, Agent and Schedule) is checked against one
policy at a time; each test then adds what breaks the rule.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from reconciler import policy

BASE = """\
    apiVersion: spos/v1
    kind: Capability
    metadata:
      name: worker
    spec:
      allowed:
        read: [/opt/worker]
        write: [/var/lib/worker]
        execute: [/usr/bin/python3]
        network: [loopback]
    ---
    apiVersion: spos/v1
    kind: Quota
    metadata:
      name: worker
    spec:
      cpu: "50%"
      memory: 512M
      tasksMax: 64
      ioWeight: 100
    ---
    apiVersion: spos/v1
    kind: Agent
    metadata:
      name: worker
    spec:
      capability: worker
      quota: worker
      tasks:
        tick:
          command: ["/usr/bin/python3", "/opt/worker/tick.py"]
          timeout: 5m
    ---
    apiVersion: spos/v1
    kind: Schedule
    metadata:
      name: worker-hourly
    spec:
      agent: worker
      task: tick
      cron: "0 * * * *"
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    (root / "agents.d").mkdir(parents=True)
    (root / "policies").mkdir()
    (root / "agents.d" / "base.yaml").write_text(dedent(BASE))
    monkeypatch.chdir(root)
    return root


def add(root: Path, relative: str, text: str) -> None:
    (root / relative).write_text(dedent(text))


def capability(name: str, allowed: str, denied: str = "{}") -> str:
    return f"""\
        apiVersion: spos/v1
        kind: Capability
        metadata:
          name: {name}
        spec:
          allowed: {allowed}
          denied: {denied}
    """


def problems(result) -> list[str]:
    """The report of a failed `spos validate`: one string per problem, its hint on a second line."""
    assert result.code == 1, result
    *lines, last = result.err.splitlines()
    found: list[str] = []
    for line in lines:
        if line.startswith("    hint: "):
            found[-1] += "\n" + line
        else:
            found.append(line)
    assert last == f"{len(found)} problem{'s' if len(found) != 1 else ''} found; nothing was changed."
    return found


def test_the_base_project_complies_with_every_rule(project, spos):
    add(project, "policies/all.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: all
        spec:
          deny:
            read: [/etc/shadow]
            write: [/usr/bin, /opt/worker]
            execute: [/usr/bin/sudo]
            devices: [/dev/mem]
            network: [any]
          ceilings: {cpu: "50%", memory: 512M, tasksMax: 64, ioWeight: 100, timeout: 5m}
          schedules: {minInterval: 1h}
          require: {capability: true, quota: true}
    """)
    result = spos("validate", "agents.d")
    assert result.code == 1  # loopback is a network destination, and `any` denies all of them
    assert problems(result) == [
        "agents.d/base.yaml:10:15: error: allowing network 'loopback' grants 'any', which policy "
        "'all' (policies/all.yaml:1) denies (at spec.allowed.network[0])\n"
        "    hint: narrow the rule, or add 'any' to spec.denied.network",
    ]
    add(project, "agents.d/base.yaml", dedent(BASE).replace("network: [loopback]", "network: [none]"))
    assert spos("validate", "agents.d").code == 0


DENY_WRITE = """\
    # nothing may write system binaries
    apiVersion: spos/v1
    kind: Policy
    metadata:
      name: no-system-writes
    spec:
      deny:
        write: [/usr/bin]
"""


def test_deny_write_covers_the_path_what_is_below_and_what_is_above(project, spos):
    add(project, "policies/no-system-writes.yaml", DENY_WRITE)
    add(project, "agents.d/probe.yaml", capability(
        "probe", "{write: [/usr, /usr/bin/tool, /usr/binaries, /var/tmp, /usr/local/../bin, //usr/bin]}"))
    by = "policy 'no-system-writes' (policies/no-system-writes.yaml:2) denies"
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/probe.yaml:6:21: error: allowing write of /usr grants /usr/bin, which {by} "
        "(at spec.allowed.write[0])",
        f"agents.d/probe.yaml:6:27: error: allowing write of /usr/bin/tool grants /usr/bin, which {by} "
        "(at spec.allowed.write[1])",
        f"agents.d/probe.yaml:6:67: error: allowing write of /usr/local/../bin grants /usr/bin, "
        f"which {by} (at spec.allowed.write[4])",
        f"agents.d/probe.yaml:6:86: error: allowing write of //usr/bin grants /usr/bin, which {by} "
        "(at spec.allowed.write[5])",
    ]


def test_deny_write_does_not_look_at_read_or_execute(project, spos):
    add(project, "policies/no-system-writes.yaml", DENY_WRITE)
    add(project, "agents.d/probe.yaml", capability("probe", "{read: [/usr/bin], execute: [/usr/bin/env]}"))
    assert spos("validate", "agents.d").code == 0


@pytest.mark.parametrize("access, denied, allowed", [
    ("read", "/etc/systemprompt-os/secrets", "/etc"),
    ("execute", "/usr/bin/sudo", "/usr/bin"),
    ("devices", "/dev/mem", "/dev/mem"),
])
def test_deny_read_execute_and_devices(project, spos, access, denied, allowed):
    add(project, "policies/guard.yaml", f"""\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: guard
        spec:
          deny:
            {access}: [{denied}]
    """)
    add(project, "agents.d/probe.yaml", capability("probe", f"{{{access}: [{allowed}]}}"))
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/probe.yaml:6:{13 + len(access) + 3}: error: allowing {access} of {allowed} grants "
        f"{denied}, which policy 'guard' (policies/guard.yaml:1) denies (at spec.allowed.{access}[0])",
    ]


NO_METADATA_SERVICE = """\
    apiVersion: spos/v1
    kind: Policy
    metadata:
      name: no-metadata
    spec:
      deny:
        network: [169.254.169.254/32, "10.20.0.5/32:443", "fd00::/8"]
"""


def test_deny_network_any_grants_every_denied_destination(project, spos):
    add(project, "policies/no-metadata.yaml", NO_METADATA_SERVICE)
    add(project, "agents.d/probe.yaml", capability("probe", "{network: [loopback, any]}"))
    by = "policy 'no-metadata' (policies/no-metadata.yaml:1) denies"
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/probe.yaml:6:33: error: allowing network 'any' grants {denied!r}, which {by} "
        f"(at spec.allowed.network[1])\n"
        f"    hint: narrow the rule, or add {denied!r} to spec.denied.network"
        for denied in ("10.20.0.5/32:443", "169.254.169.254/32", "fd00::/8")
    ]


@pytest.mark.parametrize("allowed, denied, violation", [
    ("169.254.0.0/16", "{}", "169.254.169.254/32"),
    ("169.254.169.254/32:80", "{}", "169.254.169.254/32"),
    ("10.0.0.0/8", "{}", "10.20.0.5/32:443"),
    ("10.20.0.5/32:443", "{}", "10.20.0.5/32:443"),
    ("0.0.0.0/0:443", "{network: [169.254.0.0/16]}", "10.20.0.5/32:443"),
    ("[fd12::/16]:22", "{}", "fd00::/8"),
    # A host name resolves only when a run starts, to any address: it reaches every range.
    ("metadata.example.net", "{network: [10.20.0.5/32, \"fd00::/8\"]}", "169.254.169.254/32"),
    ("https://arxiv.org", "{network: [169.254.0.0/16, \"fd00::/8\"]}", "10.20.0.5/32:443"),
    ("*:443", "{network: [169.254.0.0/16, \"fd00::/8\"]}", "10.20.0.5/32:443"),
])
def test_deny_network_catches_every_rule_that_reaches_a_denied_destination(
        project, spos, allowed, denied, violation):
    add(project, "policies/no-metadata.yaml", NO_METADATA_SERVICE)
    add(project, "agents.d/probe.yaml", capability("probe", f'{{network: ["{allowed}"]}}', denied))
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/probe.yaml:6:23: error: allowing network {allowed!r} grants {violation!r}, which "
        "policy 'no-metadata' (policies/no-metadata.yaml:1) denies (at spec.allowed.network[0])\n"
        f"    hint: narrow the rule, or add {violation!r} to spec.denied.network",
    ]


@pytest.mark.parametrize("allowed, denied", [
    ("any", '{network: [169.254.0.0/16, 10.20.0.5/32, "fd00::/8"]}'),
    ("10.20.0.5/32:80", "{}"),
    ("10.20.0.6/32", "{}"),
    ("loopback", "{}"),
    ("none", "{}"),
    ("[fe80::/10]:443", "{}"),
    ("https://arxiv.org", '{network: [169.254.0.0/16, 10.20.0.5/32, "fd00::/8"]}'),
    ("*:22", '{network: [169.254.0.0/16, "fd00::/8"]}'),
])
def test_deny_network_accepts_rules_that_miss_or_carve_out_the_denied_destinations(
        project, spos, allowed, denied):
    add(project, "policies/no-metadata.yaml", NO_METADATA_SERVICE)
    add(project, "agents.d/probe.yaml", capability("probe", f'{{network: ["{allowed}"]}}', denied))
    assert spos("validate", "agents.d").code == 0


def test_a_network_rule_that_is_no_address_is_refused_before_policies_run(project, spos):
    add(project, "policies/no-metadata.yaml", NO_METADATA_SERVICE)
    add(project, "agents.d/probe.yaml", capability("probe", '{network: ["1:2:3"]}'))
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/probe.yaml:6:23: error: '1:2:3' is not a network rule: '1:2:3' does not appear to "
        "be an IPv4 or IPv6 network (at spec.allowed.network[0])\n"
        "    hint: write any, loopback, none, or an address or CIDR with an optional :port",
    ]


@pytest.mark.parametrize("field, ceiling, value, label", [
    ("cpu", '"100%"', '"150%"', "CPU 150%"),
    ("memory", "1Gi", "2G", "memory 2G"),
    ("tasksMax", "128", "256", "tasksMax 256"),
    ("ioWeight", "100", "200", "ioWeight 200"),
])
def test_quota_ceilings(project, spos, field, ceiling, value, label):
    add(project, "policies/ceilings.yaml", f"""\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: ceilings
        spec:
          ceilings:
            {field}: {ceiling}
    """)
    add(project, "agents.d/probe.yaml", f"""\
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: probe
        spec:
          {field}: {value}
    """)
    shown = ceiling.strip('"')
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/probe.yaml:6:3: error: {label} is above the ceiling {shown} of policy 'ceilings' "
        f"(policies/ceilings.yaml:1) (at spec.{field})",
    ]


def test_a_quota_at_the_ceiling_or_below_it_is_fine(project, spos):
    add(project, "policies/ceilings.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: ceilings
        spec:
          ceilings: {cpu: "50%", memory: 512M, tasksMax: 64, ioWeight: 100}
    """)
    add(project, "agents.d/probe.yaml", """\
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: probe
        spec: {cpu: "49.5%", memory: 488Mi, tasksMax: 1, ioWeight: 100}
    """)
    assert spos("validate", "agents.d").code == 0


def test_timeout_ceiling_counts_the_default_timeout(project, spos):
    add(project, "policies/short.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: short
        spec:
          ceilings:
            timeout: 30m
    """)
    add(project, "agents.d/probe.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          capability: worker
          quota: worker
          tasks:
            long:
              command: ["/bin/true"]
              timeout: 1h30m
            defaulted:
              command: ["/bin/true"]
            short:
              command: ["/bin/true"]
              timeout: 30m
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/probe.yaml:11:7: error: timeout 1h30m is above the ceiling 30m of policy 'short' "
        "(policies/short.yaml:1) (at spec.tasks.long.timeout)",
        "agents.d/probe.yaml:12:5: error: the default timeout 1h is above the ceiling 30m of policy "
        "'short' (policies/short.yaml:1) (at spec.tasks.defaulted)\n"
        "    hint: set a timeout of at most 30m",
    ]


def test_schedules_min_interval(project, spos):
    add(project, "policies/calm.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: calm
        spec:
          schedules:
            minInterval: 2d
    """)
    add(project, "agents.d/probe.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: every-5m}
        spec: {agent: worker, task: tick, cron: "*/5 * * * *"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: mon-and-tue}
        spec: {agent: worker, task: tick, cron: "0 9 * * 1,2"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: repeating-timer}
        spec: {agent: worker, task: tick, timer: {onBootSec: 1m, onUnitActiveSec: 36h}}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: weekly}
        spec: {agent: worker, task: tick, cron: "30 3 * * 0"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: monthly}
        spec: {agent: worker, task: tick, cron: "@monthly"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: at-boot}
        spec: {agent: worker, task: tick, cron: "@reboot"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: boot-timer}
        spec: {agent: worker, task: tick, timer: {onBootSec: 1m}}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: calendar-10m}
        spec: {agent: worker, task: tick, timer: {onCalendar: "*:0/10"}}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: calendar-pair}
        spec: {agent: worker, task: tick, timer: {onCalendar: ["Sun 08:00", "Sun 08:00:30"]}}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: calendar-weekly}
        spec: {agent: worker, task: tick, timer: {onCalendar: "Mon *-*-* 04:00"}}
    """)
    add(project, "agents.d/base.yaml", dedent(BASE).replace('cron: "0 * * * *"', 'cron: "0 0 1,15 * *"'))
    by = "of policy 'calm' (policies/calm.yaml:1)"
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/probe.yaml:4:35: error: fires every 5m, more often than the minimum interval 2d "
        f"{by} (at spec.cron)",
        f"agents.d/probe.yaml:9:35: error: fires every 24h, more often than the minimum interval 2d "
        f"{by} (at spec.cron)",
        f"agents.d/probe.yaml:14:58: error: fires every 36h, more often than the minimum interval 2d "
        f"{by} (at spec.timer.onUnitActiveSec)",
        f"agents.d/probe.yaml:39:43: error: fires every 10m, more often than the minimum interval 2d "
        f"{by} (at spec.timer.onCalendar)",
        f"agents.d/probe.yaml:44:43: error: fires every 30s, more often than the minimum interval 2d "
        f"{by} (at spec.timer.onCalendar)",
    ]


def test_require_capability_and_quota(project, spos):
    add(project, "policies/require.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: require
        spec:
          require:
            capability: true
            quota: true
    """)
    add(project, "agents.d/probe.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            tick:
              command: ["/bin/true"]
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/probe.yaml:5:1: error: every Agent must name a capability (policy 'require' "
        "(policies/require.yaml:1)) (at spec)\n"
        "    hint: add spec.capability",
        "agents.d/probe.yaml:5:1: error: every Agent must name a quota (policy 'require' "
        "(policies/require.yaml:1)) (at spec)\n"
        "    hint: add spec.quota",
    ]


def test_require_false_requires_nothing(project, spos):
    add(project, "policies/require.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: require
        spec:
          require: {capability: false}
    """)
    add(project, "agents.d/probe.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks: {tick: {command: ["/bin/true"]}}
    """)
    assert spos("validate", "agents.d").code == 0


def test_every_policy_is_applied_and_named(project, spos):
    add(project, "policies/a.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata: {name: small-quotas}
        spec: {ceilings: {memory: 256M}}
        ---
        apiVersion: spos/v1
        kind: Policy
        metadata: {name: tiny-quotas}
        spec: {ceilings: {memory: 128M}}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/base.yaml:18:3: error: memory 512M is above the ceiling 128M of policy "
        "'tiny-quotas' (policies/a.yaml:6) (at spec.memory)",
        "agents.d/base.yaml:18:3: error: memory 512M is above the ceiling 256M of policy "
        "'small-quotas' (policies/a.yaml:1) (at spec.memory)",
    ]


def test_a_broken_policy_is_reported_and_enforces_nothing(project, spos):
    add(project, "policies/broken.yaml", """\
        apiVersion: spos/v1
        kind: Policy
        metadata:
          name: broken
        spec:
          ceilings:
            memory: 1M
            memroy: 1M
    """)
    assert problems(spos("validate", "agents.d")) == [
        "policies/broken.yaml:8:5: error: unknown field 'memroy' (at spec.ceilings.memroy)\n"
        "    hint: did you mean 'memory'?",
    ]


@pytest.mark.parametrize("rule, expected", [
    ("any", [("0.0.0.0/0", None), ("::/0", None)]),
    ("loopback", [("127.0.0.0/8", None), ("::1/128", None)]),
    ("none", []),
    ("10.0.0.0/8", [("10.0.0.0/8", None)]),
    ("10.20.0.5/32:443", [("10.20.0.5/32", 443)]),
    ("10.20.0.5", [("10.20.0.5/32", None)]),
    ("fd00::/8", [("fd00::/8", None)]),
    ("[2001:db8::/32]:443", [("2001:db8::/32", 443)]),
])
def test_network_rules_as_destinations(rule, expected):
    assert [(str(net), port) for net, port in policy.destinations(rule)] == expected
