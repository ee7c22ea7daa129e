"""Fleet targeting: one repository, many devices, each rendering only the Agents whose selector
matches its labels (docs/manifests.md, "Selectors" and "Device labels").

The matching itself is pure (reconciler/selector.py) and filtered once in render.py; the labels
come from the device's labels file and spos's own facts (reconciler/labels.py), or from
`--device-labels`. Golden cases in tests/cases/selector/ show what apply does on the device.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from reconciler import labels as labels_module
from reconciler import memo as memo_module
from reconciler.device import Device
from reconciler.errors import ManifestError, UsageError
from reconciler.manifest import Manifest, ManifestSet
from reconciler.render import SHOWN_NAMES, input_keys, notices, render
from reconciler.resource import Facts
from reconciler.selector import matches

STATE = "var/lib/systemprompt-os"
LABELS = f"{STATE}/device-labels.yaml"
INVENTORY = f"{STATE}/inventory.json"
MEMO = f"{STATE}/cache/plan.marshal"
SPOS_COMMAND = ("/usr/local/bin/spos",)


# Matching

def expression(key: str, operator: str, *values: str) -> dict:
    return {"matchExpressions": [{"key": key, "operator": operator, "values": list(values)}]}


MATCHING = [
    # (selector, device labels, selected)
    (None, {}, True),
    ({}, {}, True),
    ({}, {"role": "edge"}, True),
    ({"matchLabels": {}, "matchExpressions": []}, {"role": "edge"}, True),
    ({"matchLabels": {"role": "edge"}}, {"role": "edge", "site": "berlin"}, True),
    ({"matchLabels": {"role": "edge"}}, {"role": "research"}, False),
    ({"matchLabels": {"role": "edge"}}, {}, False),
    ({"matchLabels": {"role": ""}}, {"role": ""}, True),
    ({"matchLabels": {"role": ""}}, {}, False),
    ({"matchLabels": {"role": "edge", "site": "berlin"}}, {"role": "edge"}, False),
    (expression("site", "In", "berlin", "hamburg"), {"site": "hamburg"}, True),
    (expression("site", "In", "berlin", "hamburg"), {"site": "munich"}, False),
    (expression("site", "In", "berlin"), {}, False),
    (expression("site", "NotIn", "berlin"), {"site": "munich"}, True),
    (expression("site", "NotIn", "berlin"), {"site": "berlin"}, False),
    (expression("site", "NotIn", "berlin"), {}, True),
    (expression("gpu", "Exists"), {"gpu": ""}, True),
    (expression("gpu", "Exists"), {}, False),
    ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": "a100"}, True),
    (expression("gpu", "DoesNotExist"), {}, True),
    (expression("gpu", "DoesNotExist"), {"gpu": "a100"}, False),
    ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"role": "x"}, True),
    ({"matchLabels": {"role": "edge"}, **expression("site", "In", "berlin")},
     {"role": "edge", "site": "berlin"}, True),
    ({"matchLabels": {"role": "edge"}, **expression("site", "In", "berlin")},
     {"role": "edge", "site": "munich"}, False),
    ({"matchExpressions": [
        {"key": "site", "operator": "In", "values": ["berlin"]},
        {"key": "gpu", "operator": "DoesNotExist"}]},
     {"site": "berlin", "gpu": "a100"}, False),
    ({"matchLabels": {"spos.dev/arch": "arm64"}}, {"spos.dev/arch": "arm64"}, True),
]


@pytest.mark.parametrize("selector, labels, selected", MATCHING)
def test_a_selector_matches_as_the_manifest_reference_says(selector, labels, selected):
    assert matches(selector, labels) is selected


def test_the_examples_of_the_schema_match_a_device_that_has_them():
    common = json.loads((Path(__file__).parent.parent / "schemas/common.schema.json").read_text())
    for example in common["$defs"]["selector"]["examples"]:
        assert matches(example, {"hardware": "rpi4", "site": "berlin"})
        assert not matches(example, {"hardware": "rpi4", "site": "munich"})


# Rendering: filtered once, before the kinds

def manifest(kind: str, name: str, spec: dict, origin: str = "") -> Manifest:
    return Manifest(kind, name, spec, {}, "fleet.yaml", 0, 1, origin=origin or f"{kind}/{name}")


def agent(name: str, selector: dict | None = None) -> Manifest:
    spec = {"tasks": {"run": {"command": ["/bin/true"]}}}
    if selector is not None:
        spec["selector"] = selector
    return manifest("Agent", name, spec)


def fleet_set() -> ManifestSet:
    return ManifestSet([
        agent("research", {"matchLabels": {"role": "research"}}),
        manifest("Schedule", "research-hourly", {"agent": "research", "task": "run", "cron": "0 * * * *"}),
        manifest("Schedule", "research-boot", {"agent": "research", "task": "run", "timer": {"onBootSec": "2m"}}),
        manifest("Trigger", "research-drop", {"agent": "research", "task": "run",
                                              "filesystem": {"path": "/srv/drop"}}),
        agent("edge", expression("role", "In", "edge", "gateway")),
        manifest("Schedule", "edge-hourly", {"agent": "edge", "task": "run", "cron": "5 * * * *"}),
        agent("everywhere"),
    ], digest="sha256:fleet")


def facts(**labels: str) -> Facts:
    return Facts(spos_command=SPOS_COMMAND, cgroup_version=2, cgroup_weight_file="io.weight",
                 labels=labels)


def test_an_untargeted_agent_renders_nothing_of_its_own():
    assert sorted(render(fleet_set(), facts(role="edge"))) == [
        "agent/edge", "agent/everywhere", "cgroup/edge", "cgroup/everywhere", "cron/edge-hourly"]
    assert sorted(render(fleet_set(), facts(role="research"))) == [
        "agent/everywhere", "agent/research", "cgroup/everywhere", "cgroup/research",
        "cron/research-hourly", "timer/research-boot", "trigger/research-drop"]
    assert sorted(render(fleet_set(), facts())) == ["agent/everywhere", "cgroup/everywhere"]


def test_reused_resources_of_an_untargeted_agent_are_not_desired():
    """The memo offers digests by input key; a Trigger's key names only the Trigger, so
    whether it is still rendered must not depend on the offer."""
    research = render(fleet_set(), facts(role="research"))
    keys = input_keys(fleet_set())
    offered = {rid: research[rid].digest for rid in research if rid in keys}
    assert "trigger/research-drop" in offered
    assert sorted(render(fleet_set(), facts(role="edge"), offered)) == sorted(
        render(fleet_set(), facts(role="edge")))


def test_reused_resources_of_a_targeted_agent_load_in_full():
    research = render(fleet_set(), facts(role="research"))
    offered = {rid: r.digest for rid, r in research.items()}
    reused = render(fleet_set(), facts(role="research"), offered)
    assert reused == research


def test_the_plan_notices_name_the_agents_left_out_and_the_labels():
    said = notices(fleet_set(), facts(role="edge", site="berlin"))
    assert said[0] == (
        "1 Agent(s) do not target this device (labels: role=edge,site=berlin): research. Their "
        "selectors do not match, so neither they nor their Schedules and Triggers are rendered here.")
    assert not any("timer" in line for line in said), "an untargeted timer is not written at all"
    assert notices(fleet_set(), facts(role="research"))[0].startswith("1 Agent(s)")
    assert "labels: none): edge, research." in notices(fleet_set(), facts())[0]


def test_a_long_list_of_agents_left_out_is_counted_not_listed():
    many = ManifestSet([agent(f"a{n:03}", {"matchLabels": {"role": "x"}}) for n in range(25)])
    said = notices(many, facts())[0]
    assert said.startswith("25 Agent(s) do not target this device")
    assert f"a{SHOWN_NAMES - 1:03} and {25 - SHOWN_NAMES} more." in said


def test_facts_with_equal_labels_are_equal_whatever_their_order():
    one = Facts(spos_command=SPOS_COMMAND, labels={"b": "2", "a": "1"})
    other = Facts(spos_command=SPOS_COMMAND, labels=[("a", "1"), ("b", "2")])
    assert one == other and repr(one) == repr(other)
    assert one.label_map == {"a": "1", "b": "2"}
    assert repr(one) != repr(Facts(spos_command=SPOS_COMMAND, labels={"a": "1", "b": "3"}))


# The device's labels

@pytest.fixture
def labelled_root(device_root: Path) -> Path:
    (device_root / "etc").mkdir()
    (device_root / "etc/hostname").write_text("# set by the installer\nEdge-7\n")
    (device_root / STATE).mkdir(parents=True)
    (device_root / LABELS).write_text('role: research\nsite: berlin\nexample.org/rack: "12"\n')
    return device_root


def uname(nodename: str, machine: str):
    return lambda: os.uname_result(("Linux", nodename, "6.1.0", "#1 SMP", machine))


def test_the_labels_file_and_the_facts_are_the_device_labels(labelled_root):
    found = labels_module.device_labels(Device(labelled_root), uname=uname("ci-runner", "aarch64"))
    assert found == {
        "role": "research", "site": "berlin", "example.org/rack": "12",
        "spos.dev/hostname": "edge-7", "spos.dev/arch": "arm64",
    }


def test_without_a_labels_file_or_hostname_file_the_facts_remain(device_root):
    found = labels_module.device_labels(Device(device_root), uname=uname("Build-3", "x86_64"))
    assert found == {"spos.dev/hostname": "build-3", "spos.dev/arch": "amd64"}


def test_the_facts_are_this_machine_s_by_default(device_root):
    import platform
    import socket

    assert labels_module.device_labels(Device(device_root)) == {
        "spos.dev/hostname": socket.gethostname().lower(),
        "spos.dev/arch": labels_module.architecture(platform.machine()),
    }


@pytest.mark.parametrize("machine, arch", [
    ("x86_64", "amd64"), ("AMD64", "amd64"), ("aarch64", "arm64"), ("arm64", "arm64"),
    ("armv7l", "arm"), ("armv6l", "arm"), ("armv8l", "arm"), ("i686", "386"), ("i386", "386"),
    ("riscv64", "riscv64"), ("ppc64le", "ppc64le"), ("s390x", "s390x"), ("loongarch64", "loong64"),
])
def test_the_architecture_is_named_as_kubernetes_names_it(machine, arch):
    assert labels_module.architecture(machine) == arch


def test_the_option_gives_the_complete_label_set(labelled_root):
    given = "role=edge, spos.dev/arch=arm64,empty="
    assert labels_module.device_labels(Device(labelled_root), given) == {
        "role": "edge", "spos.dev/arch": "arm64", "empty": ""}
    assert labels_module.device_labels(Device(labelled_root), "") == {}


@pytest.mark.parametrize("given, message", [
    ("role", "'role' is not KEY=VALUE"),
    ("role=a,role=b", "'role' is given twice"),
    ("bad key=v", "'bad key' is not a valid label key"),
    ("role=a b", "'a b' is not a valid value for label 'role'"),
    ("-role=x", "'-role' is not a valid label key"),
    ("role=" + "x" * 64, "is not a valid value for label 'role'"),
])
def test_a_bad_option_is_a_usage_error(given, message):
    with pytest.raises(UsageError) as raised:
        labels_module.parse_option(given)
    assert str(raised.value).startswith("--device-labels: ")
    assert message in str(raised.value)


BAD_FILES = [
    ("role: research\nsite: 1\n", 2, "the value of label 'site' is 1, not a string"),
    ("role: research\nenabled: true\n", 2, "the value of label 'enabled' is true, not a string"),
    ("role:\n", 1, "the value of label 'role' is null, not a string"),
    ("role: research\nspos.dev/hostname: other\n", 2, "uses the spos.dev/ prefix"),
    ("node.spos.dev/zone: a\n", 1, "uses the spos.dev/ prefix"),
    ("role: research\n\nbad key: x\n", 3, "'bad key' is not a valid label key"),
    ("role: two words\n", 1, "'two words' is not a valid value for label 'role'"),
    ("role: research\nrole: edge\n", 2, "duplicate key"),
    ("- role\n- research\n", 1, "must be a mapping"),
    ("role: research\n---\nsite: berlin\n", 3, "more than one YAML document"),
    ("role: !!python/object:os.system x\n", 1, "not allowed"),
    ("role: [unclosed\n", 2, "invalid YAML"),
    ("1: one\n", 1, "mapping key 1 is read as a number"),
]


@pytest.mark.parametrize("text, line, summary", BAD_FILES)
def test_a_bad_labels_file_names_file_and_line(labelled_root, text, line, summary):
    (labelled_root / LABELS).write_text(text)
    with pytest.raises(ManifestError) as raised:
        labels_module.device_labels(Device(labelled_root))
    problem = raised.value.diagnostics[0]
    assert problem.file == str(labelled_root / LABELS)
    assert (problem.line, summary in problem.summary) == (line, True), problem


def test_an_empty_labels_file_is_no_labels(labelled_root):
    (labelled_root / LABELS).write_text("# no labels yet\n")
    assert labels_module.read_file(Device(labelled_root)) == {}


def test_every_problem_in_the_labels_file_is_reported(labelled_root):
    (labelled_root / LABELS).write_text("a: 1\nb: ok\nspos.dev/x: y\n")
    with pytest.raises(ManifestError) as raised:
        labels_module.read_file(Device(labelled_root))
    assert [(d.line, d.col) for d in raised.value.diagnostics] == [(1, 1), (3, 1)]


def test_a_host_name_that_is_no_label_value_is_refused(labelled_root):
    (labelled_root / "etc/hostname").write_text("h" * 64 + "\n")
    with pytest.raises(UsageError, match="not a valid label value for spos.dev/hostname"):
        labels_module.device_labels(Device(labelled_root))


# The command line: one repository, two devices

FLEET = """\
apiVersion: spos/v1
kind: Agent
metadata: {name: research-001}
spec:
  selector:
    matchLabels: {role: research}
  tasks:
    scan:
      command: ["/bin/true"]
---
apiVersion: spos/v1
kind: Schedule
metadata: {name: research-001-hourly}
spec: {agent: research-001, task: scan, cron: "0 * * * *"}
---
apiVersion: spos/v1
kind: Agent
metadata: {name: sensor-001}
spec:
  selector:
    matchExpressions:
      - {key: role, operator: In, values: [edge, gateway]}
      - {key: spos.dev/arch, operator: In, values: [arm64, arm]}
  tasks:
    read:
      command: ["/bin/true"]
---
apiVersion: spos/v1
kind: Schedule
metadata: {name: sensor-001-minutely}
spec: {agent: sensor-001, task: read, cron: "* * * * *"}
---
apiVersion: spos/v1
kind: Agent
metadata: {name: monitor-001}
spec:
  tasks:
    check:
      command: ["/bin/true"]
"""
TRIGGERS = """\
apiVersion: spos/v1
kind: Trigger
metadata: {name: research-001-drop}
spec:
  agent: research-001
  task: scan
  filesystem: {path: /srv/dropbox}
"""


@pytest.fixture
def fleet(tmp_path) -> Path:
    """The fleet's repository. The Trigger has a file of its own: an edit to its Agent's file
    leaves its input key (render.input_keys) as it was."""
    directory = tmp_path / "fleet/agents.d"
    directory.mkdir(parents=True)
    (directory / "fleet.yaml").write_text(FLEET)
    (directory / "triggers.yaml").write_text(TRIGGERS)
    return directory


def desired_ids(spos, fleet, root, *args) -> list[str]:
    result = spos("plan", fleet, "--root", root, "--json", *args)
    assert result.code == 0, result.err
    return sorted(json.loads(result.out)["desired"])


def test_one_repository_plans_differently_for_two_devices(spos, fleet, device_root):
    research = desired_ids(spos, fleet, device_root, "--device-labels", "role=research")
    edge = desired_ids(spos, fleet, device_root, "--device-labels", "role=edge,spos.dev/arch=arm64")
    assert research == ["agent/monitor-001", "agent/research-001", "cron/research-001-hourly",
                        "trigger/research-001-drop"]
    assert edge == ["agent/monitor-001", "agent/sensor-001", "cron/sensor-001-minutely"]
    amd64_edge = desired_ids(spos, fleet, device_root, "--device-labels", "role=edge,spos.dev/arch=amd64")
    assert amd64_edge == ["agent/monitor-001"]


def test_the_plan_says_which_agents_do_not_target_the_device(spos, fleet, device_root):
    result = spos("plan", fleet, "--root", device_root, "--json", "--device-labels", "role=edge")
    notices = json.loads(result.out)["notices"]
    assert notices[0].startswith(
        "2 Agent(s) do not target this device (labels: role=edge): research-001, sensor-001.")
    text = spos("plan", fleet, "--root", device_root, "--device-labels", "role=edge")
    assert "Note: 2 Agent(s) do not target this device" in text.out


def test_the_device_labels_come_from_its_root(spos, fleet, labelled_root):
    (labelled_root / LABELS).write_text("role: research\n")
    assert desired_ids(spos, fleet, labelled_root) == [
        "agent/monitor-001", "agent/research-001", "cron/research-001-hourly",
        "trigger/research-001-drop"]
    result = spos("plan", fleet, "--root", labelled_root, "--json")
    arch = labels_module.architecture(os.uname().machine)
    assert json.loads(result.out)["notices"][0].startswith(
        f"1 Agent(s) do not target this device (labels: role=research,spos.dev/arch={arch},"
        "spos.dev/hostname=edge-7): sensor-001.")


def test_the_option_replaces_the_labels_file_and_the_facts(spos, fleet, labelled_root):
    result = spos("plan", fleet, "--root", labelled_root, "--json", "--device-labels", "role=edge")
    assert "(labels: role=edge)" in json.loads(result.out)["notices"][0]


def test_a_bad_labels_file_fails_apply_and_changes_nothing(spos, fleet, labelled_root):
    (labelled_root / LABELS).write_text("role: research\nsite: 1\n")
    lock = Path(STATE, "apply.lock")  # the apply took the lock before it read anything

    def found() -> list[Path]:
        return sorted(p.relative_to(labelled_root) for p in labelled_root.rglob("*")
                      if p.relative_to(labelled_root) != lock)

    before = found()
    result = spos("apply", fleet, "--root", labelled_root, "--auto-approve")
    assert result.code == 1
    assert f"{labelled_root / LABELS}:2:1: error: the value of label 'site' is 1" in result.err
    assert "nothing was changed" in result.err
    assert found() == before


def test_a_bad_option_fails_plan_clearly(spos, fleet, device_root):
    result = spos("plan", fleet, "--root", device_root, "--device-labels", "role")
    assert (result.code, result.err) == (1, "spos: error: --device-labels: 'role' is not KEY=VALUE\n")


def test_validate_checks_every_manifest_whatever_it_targets(spos, fleet, labelled_root):
    """sensor-001 does not target this device (role=research), and its Schedule is still
    checked: by validate, which knows no device, and by plan, before anything renders."""
    result = spos("validate", fleet, "--json")
    assert json.loads(result.out)["manifests"] == 6
    (fleet / "fleet.yaml").write_text(FLEET.replace("task: read,", "task: reed,"))
    for command in (("validate", fleet), ("plan", fleet, "--root", labelled_root)):
        result = spos(*command)
        assert result.code == 1, command
        assert "error: Agent 'sensor-001' has no task 'reed' (at spec.task)" in result.err


def test_an_agent_that_stops_matching_is_pruned_with_its_schedule_and_trigger(
        spos, fleet, labelled_root):
    assert spos("apply", fleet, "--root", labelled_root, "--auto-approve").code == 0
    assert (labelled_root / "etc/cron.d/spos-research-001").is_file()
    assert (labelled_root / STATE / "triggers/research-001-drop.json").is_file()

    (labelled_root / LABELS).write_text("role: edge\n")
    result = spos("apply", fleet, "--root", labelled_root, "--auto-approve")
    assert result.code == 0, result.err
    assert "-   agent/research-001  (no longer in the manifests)" in result.out
    assert not (labelled_root / "etc/cron.d/spos-research-001").exists()
    assert not (labelled_root / STATE / "triggers/research-001-drop.json").exists()
    assert not (labelled_root / STATE / "agents/research-001/agent.json").exists()
    assert sorted(json.loads((labelled_root / INVENTORY).read_text())["resources"]) == [
        "agent/monitor-001"]


# The plan memo: a label change is another desired state

@pytest.fixture
def later(monkeypatch):
    """Plans run a minute from now, so every file written so far has settled (memo.py)."""
    real = time.time_ns
    monkeypatch.setattr(memo_module.time, "time_ns", lambda: real() + 60 * 1_000_000_000)


def plan_json(spos, fleet, root, *args) -> dict:
    result = spos("plan", fleet, "--root", root, "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_the_memo_gives_no_stale_plan_after_the_labels_change(spos, fleet, labelled_root, later):
    assert spos("apply", fleet, "--root", labelled_root, "--auto-approve").code == 0
    assert spos("plan", fleet, "--root", labelled_root, "--detailed-exitcode").code == 0
    assert (labelled_root / MEMO).is_file()

    (labelled_root / LABELS).write_text("role: gateway\n")
    remembered = plan_json(spos, fleet, labelled_root)
    assert {c["id"]: c["action"] for c in remembered["changes"]} == {
        "agent/research-001": "delete", "cron/research-001-hourly": "delete",
        "trigger/research-001-drop": "delete"}
    (labelled_root / MEMO).unlink()
    assert plan_json(spos, fleet, labelled_root) == remembered

    (labelled_root / LABELS).write_text("role: research\nsite: berlin\n")
    assert spos("plan", fleet, "--root", labelled_root, "--detailed-exitcode").code == 0


def test_a_preview_for_another_device_does_not_leave_its_plan_behind(
        spos, fleet, labelled_root, later):
    assert spos("apply", fleet, "--root", labelled_root, "--auto-approve").code == 0
    assert plan_json(spos, fleet, labelled_root, "--device-labels", "role=edge")["changes"]
    assert spos("plan", fleet, "--root", labelled_root, "--detailed-exitcode").code == 0


def test_a_selector_edited_to_stop_matching_drops_the_reused_trigger(
        spos, fleet, labelled_root, later):
    """Only the edited Agent's input key changes; its Trigger's key (the Trigger alone) does not,
    yet the Trigger must go with the Agent."""
    assert spos("apply", fleet, "--root", labelled_root, "--auto-approve").code == 0
    assert spos("plan", fleet, "--root", labelled_root, "--detailed-exitcode").code == 0
    path = fleet / "fleet.yaml"
    path.write_text(FLEET.replace("matchLabels: {role: research}", "matchLabels: {role: lab}"))

    incremental = plan_json(spos, fleet, labelled_root)
    assert sorted(c["id"] for c in incremental["changes"]) == [
        "agent/research-001", "cron/research-001-hourly", "trigger/research-001-drop"]
    (labelled_root / MEMO).unlink()
    assert plan_json(spos, fleet, labelled_root) == incremental
