"""The plan as users read it, locked with syrupy snapshots: the text view and the --json form.

Snapshots are made from the pure pipeline (load, render, observe, plan) with the device root
rendered as `/`, so crontab lines and digests look exactly as on a real device and do not depend
on the temporary directory the device lives in. The CLI tests at the end check that what
`spos plan` prints is that same view, rendered from the same JSON.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from reconciler import __version__
from reconciler.apply import apply
from reconciler.device import Device
from reconciler.observe import observe
from reconciler.plan import plan
from reconciler.render import notices, render
from reconciler.resource import Facts
from reconciler.state import read_inventory
from reconciler.validate import load
from reconciler.views import plan_text

SPOS_COMMAND = ("/usr/local/bin/spos",)


@pytest.fixture
def project(manifests, monkeypatch):
    """The example project as the working directory, so sources read `agents.d/<file>:<line>`."""
    monkeypatch.chdir(manifests.parent)
    return manifests.parent


def make_plan(device: Device):
    """`spos plan agents.d` for a device whose root is `/`, from the pure functions."""
    manifest_set = load("agents.d", "policies")
    facts = Facts(spos_command=SPOS_COMMAND, root="/")
    desired = render(manifest_set, facts)
    inventory = read_inventory(device)["resources"]
    actual = observe(device, set(desired) | set(inventory))
    planned = plan(
        desired, actual, inventory,
        root="/",
        manifests={"path": "agents.d", "revision": None, "digest": manifest_set.digest},
        version=__version__,
    )
    planned.notices = notices(manifest_set, facts)
    return planned


def views(planned) -> tuple[str, str]:
    data = planned.to_json()
    return plan_text(data), json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def test_examples_on_an_empty_root_create_everything(project, device_root, snapshot):
    planned = make_plan(Device(device_root))

    assert {change.action for change in planned.changes} == {"create"}
    text, as_json = views(planned)
    assert text == snapshot(name="text")
    assert as_json == snapshot(name="json")


def test_no_op_plan(project, device_root, snapshot):
    device = Device(device_root)
    apply(device, make_plan(device))

    planned = make_plan(device)

    assert planned.changes == []
    text, as_json = views(planned)
    assert text == snapshot(name="text")
    assert as_json == snapshot(name="json")


def test_update_delete_and_replace_with_reasons(project, device_root, snapshot):
    device = Device(device_root)
    apply(device, make_plan(device))
    # drift: an operator edits the health check's minute field by hand
    crontab = device_root / "etc/cron.d/spos-monitor-001"
    crontab.write_text(crontab.read_text().replace("*/5 * * * * root", "*/7 * * * * root"))
    # delete: the weekly maintenance Schedule leaves the manifests
    _edit(project / "agents.d/maintenance-001.yaml", _WEEKLY_SCHEDULE, "")
    # replace: the hourly arXiv check moves to monitor-001, so its line moves to another file
    _edit(project / "agents.d/research-001.yaml",
          "  agent: research-001\n  task: check_arxiv_papers\n",
          "  agent: monitor-001\n  task: health_check\n")

    planned = make_plan(device)

    assert [(c.id, c.action) for c in planned.changes] == [
        ("cron/maintenance-001-weekly", "delete"),
        ("cron/monitor-001-health", "update"),
        ("cron/research-001-hourly", "replace"),
    ]
    text, as_json = views(planned)
    assert text == snapshot(name="text")
    assert as_json == snapshot(name="json")


_WEEKLY_SCHEDULE = """apiVersion: spos/v1
kind: Schedule
metadata:
  name: maintenance-001-weekly
  labels:
    team: ops
spec:
  agent: maintenance-001
  task: weekly_cleanup
  cron: "30 3 * * 0"
---
"""


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name} no longer holds the text this test edits"
    path.write_text(text.replace(old, new))


# The CLI prints the same view, rendered from the same data as --json.

def test_cli_text_is_rendered_from_the_json_plan(spos, manifests, device_root):
    crontab = device_root / "etc/cron.d/spos-monitor-001"
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    crontab.write_text(crontab.read_text().replace("*/5 * * * * root", "*/7 * * * * root"))
    (manifests / "backup-001.yaml").unlink()

    as_json = spos("plan", manifests, "--root", device_root, "--json")
    as_text = spos("plan", manifests, "--root", device_root)

    assert as_json.code == as_text.code == 0
    data = json.loads(as_json.out)
    assert [c["symbol"] for c in data["changes"]] == ["-", "-", "~"]
    assert as_text.out == plan_text(data)


def test_cli_json_plan_is_only_json(spos, manifests, device_root):
    """--json output is machine-read: progress lines stay out of stdout (and out of stderr)."""
    result = spos("plan", manifests, "--root", device_root, "--json")

    assert result.code == 0
    assert json.loads(result.out)["root"] == str(device_root)
    assert result.err == ""


def test_cli_stages_announce_themselves_on_stderr(spos, manifests, device_root):
    result = spos("plan", manifests, "--root", device_root)

    assert re.findall(r"^(\w+)", result.err, re.M) == ["Loading", "Observing", "Planning"]
    assert "Loading" not in result.out
    assert os.listdir(device_root) == [], "plan writes nothing on a device spos never applied to"


def test_a_change_at_the_end_of_a_long_crontab_line_is_visible(project, device_root):
    device = Device(device_root)
    apply(device, make_plan(device))
    _edit(project / "agents.d/research-001.yaml", "startingDeadline: 30m", "startingDeadline: 45m")

    text = plan_text(make_plan(device).to_json())

    assert "--deadline 30m --cron '0 9 * * *' --cron-tz Europe/Berlin\" -> " in text
    assert "--deadline 45m --cron '0 9 * * *' --cron-tz Europe/Berlin\"\n" in text


def test_capability_and_quota_changes_are_said_in_words(spos, manifests, device_root):
    assert spos("apply", manifests, "--root", device_root, "--auto-approve").code == 0
    profiles = manifests / "profiles.yaml"
    text = profiles.read_text()
    output = "      - /var/lib/systemprompt-os/agents/research-001/output\n"
    assert text.count(output) == 1 and text.count("memory: 1G") == 1
    profiles.write_text(text.replace(output, output + "      - /data/research/output\n")
                        .replace("memory: 1G", "memory: 2G")
                        .replace("      - 169.254.169.254/32\n", ""))

    said = [line.strip() for line in spos("plan", manifests, "--root", device_root).out.splitlines()
            if line.strip().startswith("#")]
    assert "# research-001 gains write access to /data/research/output" in said
    assert "# research-001 is no longer denied network access to 169.254.169.254/32" in said
    assert "# research-001: memory 1G -> 2G" in said


@pytest.mark.parametrize("change, words", [
    ({"id": "cgroup/a", "kind": "cgroup", "before": {"memory": "255999999", "cpu": "50000 100000"},
      "after": {"memory": "3999997952", "cpu": "max"}},
     ["a: memory limit 256M -> 4G", "a: CPU limit 50% -> max"]),
    ({"id": "agent/a", "kind": "agent",
      "before": {"config": {"capability": {"name": "x", "allowed": {"execute": ["/bin/sh"]}},
                            "quota": {"retentionSeconds": {"completed": 604800}}}},
      "after": {"config": {"capability": {"name": "y", "allowed": {"devices": ["/dev/ttyUSB0"]}},
                           "quota": {"retentionSeconds": {"completed": 1209600}}}}},
     ["a now uses capability y (was x)", "a loses the right to run /bin/sh",
      "a gains access to the device /dev/ttyUSB0", "a: retention completed 7d -> 14d"]),
])
def test_words_for_one_change(change, words):
    from reconciler.views import in_words

    assert in_words(change) == words
