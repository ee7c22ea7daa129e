"""Golden cases per resource kind: one small data file per case in tests/cases/<kind>/.

A plan case holds the manifests, the device as it is (what an earlier apply left there plus hand
edits) and the changes the plan must list; after applying them the device must hold the
expected files and a second plan must be empty. An edit case feeds the pure crontab `edit()`
and states the file it must produce. A case with `xfail:` is a known gap (strict: it fails the
suite once fixed, so the marker gets removed).

Case fields (all but `description` optional):

    description: what the case shows
    root: the root rendered into crontab lines (default "/"); the device itself is a tmp dir
    cgroups: {version: 1 | 2, io: bool}   a cgroup file system of plain files at the device's
                                       /sys/fs/cgroup (its cgroup parent is `spos-<hash>`:
                                       refer to it as {parent} in device paths and attributes)
    labels: {key: value}               the device's labels when `manifests` are planned (default
                                       none), which Agents' selectors match
    applied: manifests rendered and applied first (their inventory is recorded as apply does)
    applied_labels: {key: value}       the device's labels when `applied` was applied (default
                                       `labels`): a change of labels between the two
    device: {path: text | null}        files written (null: removed) after `applied`; remove
                                       /var/lib/systemprompt-os/inventory.json to lose the inventory
    modes: {path: "0664"}              modes set after `device`
    manifests: the manifests to plan (YAML text)
    changes: [{id, action, reason, fields: [path...], before: {...}, after: {...}}], in plan
             order; before/after are matched as subsets of the change's attributes
    device_after: {path: null | text | {text, json: subset, mode: "0644", dir: bool}}
    apply_fails: {id: text in its error}   changes apply must report as failed (and the second
                                       plan must still hold); all others must succeed
    systemd: true                      systemd is the device's init system: apply activates the
                                       units it writes, through a stand-in for systemctl that
                                       records each command (conftest.RecordingSystemctl)
    systemctl: [[word, ...], ...]      the commands the apply of `manifests` ran, in order
    edit: {agent, before: text | null, changes: {id: line | null}, after: text | null}
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from reconciler.apply import apply
from reconciler.device import Device
from reconciler.kinds import cron
from reconciler.observe import observe
from reconciler.plan import plan
from reconciler.render import render
from reconciler.resource import Facts, Plan
from reconciler.state import read_inventory
from reconciler.validate import load

CASES = Path(__file__).parent / "cases"
SPOS_COMMAND = ("/usr/local/bin/spos",)


def _cases(section: str):
    for path in sorted(CASES.glob("*/*.yaml")):
        case = YAML(typ="safe").load(path.read_text())
        if section not in case:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if "xfail" in case else []
        yield pytest.param(case, id=f"{path.parent.name}/{path.stem}", marks=marks)


@pytest.mark.parametrize("case", list(_cases("manifests")))
def test_plan_case(case, tmp_path, recording_systemctl):
    systemctl = recording_systemctl(tmp_path / "device") if case.get("systemd") else None
    device = Device(tmp_path / "device", cgroup_root=str(tmp_path / "device/sys/fs/cgroup"),
                    systemd=systemctl)
    case = _with_parent(case, device.cgroups.parent)
    _fake_cgroups(device, case.get("cgroups"))
    facts = Facts(spos_command=SPOS_COMMAND, root=case.get("root", "/"),
                  cgroup_version=device.cgroups.version, cgroup_parent=device.cgroups.parent,
                  cgroup_weight_file=device.cgroups.weight_file(),
                  activate_units=systemctl is not None, labels=case.get("labels") or {})
    if "applied" in case:
        applied_facts = dataclasses.replace(facts, labels=case.get("applied_labels", facts.labels))
        result = apply(device, _plan(device, _load(case["applied"], tmp_path / "applied"), applied_facts))
        assert result.ok, result.failed
    _shape_device(device, case.get("device") or {}, case.get("modes") or {})

    manifests = _load(case["manifests"], tmp_path / "desired")
    planned = _plan(device, manifests, facts)

    if "changes" in case:
        assert [(c.id, c.action) for c in planned.changes] == [
            (spec["id"], spec["action"]) for spec in case["changes"]
        ]
        for change, spec in zip(planned.changes, case["changes"]):
            assert _as_expected(change, spec) == spec
    if systemctl is not None:
        systemctl.calls.clear()
    result = apply(device, planned)
    if "systemctl" in case:
        assert systemctl.calls == case["systemctl"]
    fails = case.get("apply_fails") or {}
    assert {change.id: error for change, error in result.failed if fails.get(change.id, "\0") not in error} == {}
    assert sorted(change.id for change, _ in result.failed) == sorted(fails)
    for path, expected in (case.get("device_after") or {}).items():
        _assert_file(device, path, expected)
    replanned = _plan(device, manifests, facts)
    assert sorted(c.id for c in replanned.changes) == sorted(fails), \
        "a second plan after apply holds only what apply said it could not do"


@pytest.mark.parametrize("case", list(_cases("edit")))
def test_cron_edit_case(case):
    edit = case["edit"]
    assert cron.edit(edit["before"], edit["changes"], edit["agent"]) == edit["after"]


def test_every_kind_has_cases_including_a_no_op():
    from reconciler.kinds import ALL

    for kind in ALL:
        names = {path.stem for path in (CASES / kind.name).glob("*.yaml")}
        assert "noop" in names, f"tests/cases/{kind.name}/ needs a noop case"


def _load(text: str, directory: Path):
    directory.mkdir()
    (directory / "case.yaml").write_text(text)
    return load(directory)


def _plan(device: Device, manifests, facts: Facts) -> Plan:
    """What `spos plan` computes, from the pure functions: render, observe, plan."""
    desired = render(manifests, facts)
    inventory = read_inventory(device)["resources"]
    actual = observe(device, set(desired) | set(inventory))
    return plan(
        desired, actual, inventory,
        root=facts.root, manifests={"path": "case", "revision": None, "digest": manifests.digest},
    )


def _with_parent(value, parent: str):
    """The case with `{parent}` replaced by the device's cgroup parent, in keys and values."""
    if isinstance(value, dict):
        return {_with_parent(k, parent): _with_parent(v, parent) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_parent(v, parent) for v in value]
    return value.replace("{parent}", parent) if isinstance(value, str) else value


def _fake_cgroups(device: Device, layout: dict | None) -> None:
    """A cgroup file system made of plain files: {version: 1 | 2, io: bool}. Limit files exist
    once written, as apply writes them; `device:` entries add processes (cgroup.procs)."""
    if not layout:
        return
    top = Path(device.cgroups.root)
    if layout["version"] == 1:
        for controller in ("memory", "cpu", "pids", "blkio"):
            (top / controller).mkdir(parents=True)
            (top / controller / "cgroup.procs").write_text("")
        if layout.get("io"):
            (top / "blkio/blkio.weight").write_text("500\n")
    else:
        top.mkdir(parents=True)
        controllers = "cpu memory pids" + (" io" if layout.get("io") else "")
        (top / "cgroup.controllers").write_text(controllers + "\n")
        (top / "cgroup.procs").write_text("")


def _shape_device(device: Device, files: dict, modes: dict) -> None:
    for path, content in files.items():
        host = device.root / path.lstrip("/")
        if content is None:
            if host.is_dir():
                shutil.rmtree(host)
            else:
                host.unlink()
            continue
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(content)
    for path, mode in modes.items():
        os.chmod(device.root / path.lstrip("/"), int(mode, 8))


def _as_expected(change, spec: dict) -> dict:
    """The change, reduced to the keys (and attribute subsets) the case states."""
    shown = {"id": change.id, "action": change.action, "reason": change.reason,
             "fields": [f["path"] for f in change.fields],
             "before": change.before, "after": change.after}
    return {key: _subset(shown[key], spec[key]) for key in spec}


def _subset(actual, expected):
    """`actual` cut down to the keys `expected` names, recursively (lists compare whole)."""
    if isinstance(actual, dict) and isinstance(expected, dict):
        return {key: _subset(actual.get(key, "<absent>"), value) for key, value in expected.items()}
    return actual


def _assert_file(device: Device, path: str, expected) -> None:
    host = device.root / path.lstrip("/")
    if expected is None:
        assert not os.path.lexists(host), f"{path} should be gone"
        return
    if isinstance(expected, str):
        expected = {"text": expected}
    if "dir" in expected:
        assert host.is_dir() == expected["dir"], path
    if "text" in expected:
        assert host.read_text() == expected["text"], path
    if "json" in expected:
        data = json.loads(host.read_text())
        assert _subset(data, expected["json"]) == expected["json"], path
    if "mode" in expected:
        assert format(host.stat().st_mode & 0o7777, "04o") == expected["mode"], path
