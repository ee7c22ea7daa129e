"""`spos validate`: every problem, exactly as the user reads it.

Each test writes a small manifest, runs the CLI in-process from the project directory (so files
show as `agents.d/...`), and compares the whole report: exit code, `FILE:LINE:COL`, summary,
field path and hint. Policies have their own file (test_policy.py), YAML hazards too
(test_yaml_hazards.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from textwrap import dedent

import pytest

BAD = Path(__file__).resolve().parent / "bad"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project (agents.d/, no policies/), and the working directory."""
    root = tmp_path / "project"
    (root / "agents.d").mkdir(parents=True)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def examples(manifests, monkeypatch) -> Path:
    """The example manifests and the baseline policy, and the working directory."""
    monkeypatch.chdir(manifests.parent)
    return manifests.parent


def write(root: Path, name: str, text: str) -> Path:
    path = root / "agents.d" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


def problems(result) -> list[str]:
    """The report of a failed `spos validate`: one string per problem, its hint on a second line."""
    assert result.code == 1, result
    assert result.out == ""
    *lines, last = result.err.splitlines()
    found: list[str] = []
    for line in lines:
        if line.startswith("    hint: "):
            found[-1] += "\n" + line
        else:
            found.append(line)
    assert last == f"{len(found)} problem{'s' if len(found) != 1 else ''} found; nothing was changed."
    return found


AGENT = """\
    apiVersion: spos/v1
    kind: Agent
    metadata:
      name: probe
    spec:
      tasks:
        tick:
          command: ["/bin/true"]
"""


# ---------------------------------------------------------------- valid input


def test_the_examples_validate(examples, spos):
    result = spos("validate", "agents.d")
    assert (result.code, result.out, result.err) == (0, "agents.d: 35 manifests valid.\n", "")


def test_the_examples_validate_as_json(examples, spos):
    result = spos("validate", "agents.d", "--json")
    assert result.code == 0
    assert json.loads(result.out) == {"valid": True, "manifests": 35, "diagnostics": [], "notes": []}


def test_empty_files_comment_only_files_and_bare_separators_are_fine(project, spos):
    write(project, "empty.yaml", "")
    write(project, "comments.yaml", "# nothing here yet\n# still nothing\n")
    write(project, "separators.yaml", "---\n# between\n---\n...\n")
    write(project, "probe.yaml", AGENT)
    result = spos("validate", "agents.d")
    assert (result.code, result.out) == (0, "agents.d: 1 manifests valid.\n")


def test_files_other_than_yaml_and_hidden_files_are_not_read(project, spos):
    write(project, "notes.txt", "this: is: not: yaml: [")
    write(project, ".hidden.yaml", "this: is: not: yaml: [")
    write(project, ".git/config.yaml", "this: is: not: yaml: [")
    write(project, "nested/deeper/probe.yml", AGENT)
    result = spos("validate", "agents.d")
    assert (result.code, result.out) == (0, "agents.d: 1 manifests valid.\n")


def test_a_directory_that_cannot_be_listed_is_an_error_not_skipped(project, spos, monkeypatch):
    """A subdirectory spos may not list (another owner's, mode 0700) would hide every manifest
    in it: the revision would be applied without them."""
    import os

    write(project, "probe.yaml", AGENT)
    write(project, "team/other.yaml", AGENT.replace("name: probe", "name: other"))
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("team"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/team:1:1: error: cannot read the directory: Permission denied",
    ]
    planned = spos("plan", "agents.d", "--root", project / "device")
    assert planned.code == 1
    assert "agents.d/team:1:1: error: cannot read the directory: Permission denied\n" in planned.err


def test_a_linked_directory_is_an_error_not_skipped(project, spos, tmp_path):
    """spos does not follow a directory link (one could lead back to its own parent): the
    manifests behind it are reported as not read rather than left out unnoticed."""
    write(project, "probe.yaml", AGENT)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "other.yaml").write_text(AGENT.replace("name: probe", "name: other"))
    (project / "agents.d" / "shared").symlink_to(shared)
    (project / "agents.d" / "loop").symlink_to(".")
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/loop:1:1: error: a linked directory is not read\n"
        "    hint: move its manifests here, or link each file",
        "agents.d/shared:1:1: error: a linked directory is not read\n"
        "    hint: move its manifests here, or link each file",
    ]


def test_documents_before_an_unreadable_one_still_count_for_other_files(project, spos):
    """A file whose second document cannot be read still defines the Agent of its first: the
    Schedule in another file that starts it is not reported as dangling."""
    write(project, "probe.yaml", AGENT + "---\nbroken: !!binary aGk=\n")
    write(project, "hourly.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: hourly}
        spec: {agent: probe, task: tick, cron: "0 * * * *"}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/probe.yaml:10:9: error: invalid YAML: the tag 'tag:yaml.org,2002:binary' is "
        "not allowed in manifests",
    ]


# ---------------------------------------------------------------- the document envelope


def test_unknown_top_level_key_and_the_missing_one_it_replaced(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Quota
        metdata:
          name: small
        spec: {}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:1:1: error: missing required field 'metadata'",
        "agents.d/bad.yaml:3:1: error: unknown field 'metdata' (at metdata)\n"
        "    hint: did you mean 'metadata'?",
    ]


def test_unknown_key_in_metadata(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: small
          lables: {team: ops}
        spec: {}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:5:3: error: unknown field 'lables' (at metadata.lables)\n"
        "    hint: did you mean 'labels'?",
    ]


def test_unknown_keys_at_every_level_of_an_agent_are_all_reported(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          descripton: typo in spec
          tasks:
            tick:
              command: ["/bin/true"]
              timout: 5m
              retries:
                limt: 2
                backoff:
                  intial: 10s
            scan:
              steps:
                - name: fetch
                  command: ["/bin/true"]
                  continueOnErorr: true
              schedule: "0 * * * *"
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:6:3: error: unknown field 'descripton' (at spec.descripton)\n"
        "    hint: did you mean 'description'?",
        "agents.d/bad.yaml:10:7: error: unknown field 'timout' (at spec.tasks.tick.timout)\n"
        "    hint: did you mean 'timeout'?",
        "agents.d/bad.yaml:12:9: error: unknown field 'limt' (at spec.tasks.tick.retries.limt)\n"
        "    hint: did you mean 'limit'?",
        "agents.d/bad.yaml:14:11: error: unknown field 'intial' "
        "(at spec.tasks.tick.retries.backoff.intial)\n"
        "    hint: did you mean 'initial'?",
        "agents.d/bad.yaml:19:11: error: unknown field 'continueOnErorr' "
        "(at spec.tasks.scan.steps[0].continueOnErorr)\n"
        "    hint: did you mean 'continueOnError'?",
        "agents.d/bad.yaml:20:7: error: unknown field 'schedule' (at spec.tasks.scan.schedule)\n"
        "    hint: allowed here: description, command, steps, timeout, retries, concurrency, "
        "priority, env, workdir, checkpoint, flexible, heartbeat, onSuccess, onFailure",
    ]


def test_an_agent_field_written_in_a_schedule_lists_what_is_allowed(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          agent: monitor-001
          task: health_check
          cron: "*/5 * * * *"
          priority: 90
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:9:3: error: unknown field 'priority' (at spec.priority)\n"
        "    hint: allowed here: agent, task, cron, timeZone, timer, concurrency, suspend, startingDeadline",
    ]


def test_missing_required_fields(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          labels: {team: ops}
        spec:
          tasks:
            scan:
              steps:
                - command: ["/bin/true"]
                - name: rank
            idle:
              timeout: 5m
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          cron: "0 * * * *"
        ---
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: bare
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:3:1: error: missing required field 'name' (at metadata)",
        "agents.d/bad.yaml:9:11: error: missing required field 'name' (at spec.tasks.scan.steps[0])",
        "agents.d/bad.yaml:10:11: error: missing required field 'command' "
        "(at spec.tasks.scan.steps[1])",
        "agents.d/bad.yaml:11:5: error: set one of 'command', 'steps' (at spec.tasks.idle)",
        "agents.d/bad.yaml:18:1: error: missing required field 'agent' (at spec)",
        "agents.d/bad.yaml:18:1: error: missing required field 'task' (at spec)",
        "agents.d/bad.yaml:21:1: error: missing required field 'spec'",
    ]


def test_command_and_steps_together(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            both:
              command: ["/bin/true"]
              steps:
                - {name: one, command: ["/bin/true"]}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:7:5: error: set exactly one of 'command', 'steps'; "
        "found 'command', 'steps' (at spec.tasks.both)",
    ]


def test_wrong_types_say_what_was_expected_and_what_was_found(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
          labels: {rack: 12}
        spec:
          env:
            DEBUG: true
          tasks:
            shell:
              command: "/bin/sh -c true"
              priority: high
              flexible: "yes"
            listed: ["/bin/true"]
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:5:12: error: expected a string, got a number (at metadata.labels.rack)\n"
        '    hint: quote it: "12"',
        "agents.d/bad.yaml:8:5: error: expected a string, got a boolean (at spec.env.DEBUG)\n"
        '    hint: quote it: "true"',
        "agents.d/bad.yaml:11:7: error: expected a list, got the string '/bin/sh -c true' "
        "(at spec.tasks.shell.command)",
        "agents.d/bad.yaml:12:7: error: expected an integer, got the string 'high' "
        "(at spec.tasks.shell.priority)",
        "agents.d/bad.yaml:13:7: error: expected a boolean, got the string 'yes' "
        "(at spec.tasks.shell.flexible)",
        "agents.d/bad.yaml:14:5: error: expected a mapping, got a list (at spec.tasks.listed)",
    ]


def test_bad_enum_values_suggest_the_right_spelling(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            tick:
              command: ["/bin/true"]
              concurrency: forbid
            tock:
              command: ["/bin/true"]
              concurrency: sometimes
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:9:7: error: 'forbid' is not one of Allow, Forbid, Replace, Queue "
        "(at spec.tasks.tick.concurrency)\n"
        "    hint: did you mean 'Forbid'?",
        "agents.d/bad.yaml:12:7: error: 'sometimes' is not one of Allow, Forbid, Replace, Queue "
        "(at spec.tasks.tock.concurrency)",
    ]


def test_numbers_out_of_range_and_empty_lists(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            tick:
              command: []
              priority: 101
              retries: {limit: -1}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:8:7: error: must not be empty (at spec.tasks.tick.command)",
        "agents.d/bad.yaml:9:7: error: 101 is greater than the maximum of 100 "
        "(at spec.tasks.tick.priority)",
        "agents.d/bad.yaml:10:17: error: -1 is less than the minimum of 0 "
        "(at spec.tasks.tick.retries.limit)",
    ]


def test_bad_duration_size_and_percent(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: probe
        spec:
          cpu: 50
          memory: 1GB
          storage: {temp: "1.5G"}
          retention:
            completed: 1 week
        ---
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: probe2
        spec:
          cpu: "50 %"
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:6:3: error: expected a string, got a number (at spec.cpu)\n"
        '    hint: quote it: "50"',
        "agents.d/bad.yaml:7:3: error: '1GB' is not a size (at spec.memory)\n"
        "    hint: write e.g. 512M, 2G or 1Gi",
        "agents.d/bad.yaml:8:13: error: '1.5G' is not a size (at spec.storage.temp)\n"
        "    hint: write e.g. 512M, 2G or 1Gi",
        "agents.d/bad.yaml:10:5: error: '1 week' is not a duration (at spec.retention.completed)\n"
        "    hint: write e.g. 90s, 5m, 2h, 1h30m or 7d",
        "agents.d/bad.yaml:17:3: error: '50 %' is not a percentage (at spec.cpu)\n"
        "    hint: write e.g. 50% (half a CPU) or 150%",
    ]


def test_a_size_in_bytes_may_be_an_unquoted_number(project, spos, device_root):
    write(project, "sizes.yaml", AGENT + """\
    ---
    apiVersion: spos/v1
    kind: Quota
    metadata:
      name: probe
    spec:
      memory: 268435456
      storage: {temp: 65536.0, output: 65536}
    ---
    apiVersion: spos/v1
    kind: Trigger
    metadata:
      name: hook
    spec:
      agent: probe
      task: tick
      webhook: {path: /h, secretFile: /etc/secret, maxBodySize: 100}
    """)
    assert spos("validate", "agents.d").code == 0
    write(project, "negative.yaml", """\
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: negative
        spec:
          memory: -1
    ---
    apiVersion: spos/v1
    kind: Quota
    metadata:
      name: zero
    spec:
      memory: 0.0
    """)
    negative, zero = problems(spos("validate", "agents.d"))
    assert negative.startswith("agents.d/negative.yaml:6:") and "spec.memory" in negative
    assert zero.startswith("agents.d/negative.yaml:13:") and "a memory limit of 0 lets nothing run" in zero
    (project / "agents.d" / "negative.yaml").unlink()
    result = spos("apply", "agents.d", "--root", device_root, "--auto-approve",
                  "--cgroup-root", project / "no-cgroups")
    assert result.code == 0, result.err
    registration = json.loads((device_root / "var/lib/systemprompt-os/triggers/hook.json").read_text())
    assert registration["webhook"]["maxBodyBytes"] == 100


def test_a_webhook_secret_written_into_the_manifest_is_refused_without_being_repeated(project, spos):
    """Secrets are read from a file named in the manifest, never from the manifest itself: a
    secret written in place of `secretFile` is refused, where it stands, and the error does not
    carry the secret on into CI logs."""
    write(project, "hook.yaml", """\
        apiVersion: spos/v1
        kind: Trigger
        metadata:
          name: hook
        spec:
          agent: probe
          task: tick
          webhook:
            path: /hooks/deploy
            secret: hunter2-s3cret
    """)
    result = spos("validate", "agents.d")

    assert problems(result) == [
        "agents.d/hook.yaml:8:3: error: missing required field 'secretFile' (at spec.webhook)",
        "agents.d/hook.yaml:10:5: error: unknown field 'secret' (at spec.webhook.secret)\n"
        "    hint: did you mean 'secretFile'?",
    ]
    assert "hunter2-s3cret" not in result.out + result.err


def test_paths_users_and_env_names_have_their_own_messages(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          user: Admin
          env:
            1ST: "x"
          tasks:
            tick:
              command: ["/bin/true"]
              workdir: opt/agents
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:6:3: error: 'Admin' is not a valid user name (at spec.user)\n"
        "    hint: lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32",
        "agents.d/bad.yaml:8:5: error: '1ST' is not a valid environment variable name "
        "(at spec.env.1ST)\n"
        "    hint: letters, digits and '_', not starting with a digit",
        "agents.d/bad.yaml:12:7: error: 'opt/agents' is not an absolute path "
        "(at spec.tasks.tick.workdir)\n"
        "    hint: start it with '/'",
    ]


# ---------------------------------------------------------------- names that reach the device

NAME_HINT = (
    "    hint: use lowercase letters, digits, '-' and '_', starting with a letter or digit; names "
    "become file names and crontab lines on the device"
)


@pytest.mark.parametrize("name, shown", [
    ("research.001", "'research.001'"),
    ("agents/research", "'agents/research'"),
    ('".."', "'..'"),
    ("../etc", "'../etc'"),
    ("Research", "'Research'"),
    ("-leading-dash", "'-leading-dash'"),
    ('"two words"', "'two words'"),
    ('""', "''"),
    ('"50%"', "'50%'"),
])
def test_unsafe_agent_names_are_refused(project, spos, name, shown):
    write(project, "bad.yaml", AGENT.replace("name: probe", f"name: {name}"))
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:4:3: error: {shown} is not a valid name (at metadata.name)\n{NAME_HINT}",
    ]


def test_names_are_at_most_63_characters(project, spos):
    write(project, "ok.yaml", AGENT.replace("name: probe", f"name: {'a' * 63}"))
    write(project, "bad.yaml", AGENT.replace("name: probe", f"name: {'b' * 64}"))
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:4:3: error: '{'b' * 56}... is longer than 63 characters "
        "(at metadata.name)",
    ]


def test_unsafe_task_and_step_names_point_at_the_name(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            ../../etc/cron.d/evil:
              command: ["/bin/true"]
            Tick:
              command: ["/bin/true"]
            scan:
              steps:
                - name: fetch.py
                  command: ["/bin/true"]
    """)
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:7:5: error: '../../etc/cron.d/evil' is not a valid name "
        f"(at spec.tasks.../../etc/cron.d/evil)\n{NAME_HINT}",
        f"agents.d/bad.yaml:9:5: error: 'Tick' is not a valid name (at spec.tasks.Tick)\n{NAME_HINT}",
        f"agents.d/bad.yaml:13:11: error: 'fetch.py' is not a valid name "
        f"(at spec.tasks.scan.steps[0].name)\n{NAME_HINT}",
    ]


def test_references_must_be_names_too(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          agent: ../monitor-001
          task: health_check
          cron: "*/5 * * * *"
    """)
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:6:3: error: '../monitor-001' is not a valid name (at spec.agent)\n{NAME_HINT}",
    ]


def test_step_names_are_unique_within_a_task(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            scan:
              steps:
                - name: fetch
                  command: ["/bin/true"]
                - name: rank
                  command: ["/bin/true"]
                - name: fetch
                  command: ["/bin/true"]
            other:
              steps:
                - name: rank
                  command: ["/bin/true"]
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:13:11: error: duplicate step name 'fetch': also the name of steps[0] "
        "(at spec.tasks.scan.steps[2].name)\n"
        "    hint: step names must be unique within a task; a resumed run continues at a step by name",
    ]


def test_hooks_name_tasks_of_the_same_agent(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            scan:
              command: ["/bin/true"]
              onSuccess: [report]
              onFailure: [alert, scna]
            report:
              command: ["/bin/true"]
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:10:19: error: this agent has no task 'alert' (at spec.tasks.scan.onFailure[0])\n"
        "    hint: its tasks: scan, report",
        "agents.d/bad.yaml:10:26: error: this agent has no task 'scna' (at spec.tasks.scan.onFailure[1])\n"
        "    hint: did you mean 'scan'?",
    ]


# ---------------------------------------------------------------- references


def test_a_schedule_naming_a_missing_agent(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          agent: monitor-01
          task: health_check
          cron: "*/5 * * * *"
        ---
        apiVersion: spos/v1
        kind: Trigger
        metadata:
          name: probe
        spec:
          agent: nobody
          task: health_check
          webhook: {path: /hooks/probe, secretFile: /etc/probe}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:6:3: error: Agent 'monitor-01' does not exist (at spec.agent)\n"
        "    hint: did you mean 'monitor-001'?",
        "agents.d/bad.yaml:15:3: error: Agent 'nobody' does not exist (at spec.agent)",
    ]


def test_a_schedule_naming_a_missing_task_lists_the_agents_tasks(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          agent: research-001
          task: weekly_digest
          cron: "0 9 * * 1"
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe2
        spec:
          agent: research-001
          task: check_arxiv_paper
          cron: "0 9 * * 1"
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:7:3: error: Agent 'research-001' has no task 'weekly_digest' (at spec.task)\n"
        "    hint: its tasks: check_arxiv_papers, daily_arxiv_scan",
        "agents.d/bad.yaml:16:3: error: Agent 'research-001' has no task 'check_arxiv_paper' "
        "(at spec.task)\n"
        "    hint: did you mean 'check_arxiv_papers'?",
    ]


def test_an_agent_naming_a_missing_capability_and_quota(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          capability: sandboxed
          quota: standrd
          tasks:
            tick:
              command: ["/bin/true"]
              timeout: 1m
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:6:3: error: Capability 'sandboxed' does not exist (at spec.capability)\n"
        "    hint: defined: backup, file-drop, iot-serial, maintenance, monitor, ops, research, "
        "webhook",
        "agents.d/bad.yaml:7:3: error: Quota 'standrd' does not exist (at spec.quota)\n"
        "    hint: did you mean 'standard'?",
    ]


def test_a_problem_in_one_document_does_not_hide_reference_problems_in_the_next(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: probe
        spec:
          memory: lots
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          agent: monitor-001
          task: cleanup
          cron: "*/5 * * * *"
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:6:3: error: 'lots' is not a size (at spec.memory)\n"
        "    hint: write e.g. 512M, 2G or 1Gi",
        "agents.d/bad.yaml:14:3: error: Agent 'monitor-001' has no task 'cleanup' (at spec.task)\n"
        "    hint: its tasks: health_check, boot_report",
    ]


@pytest.mark.parametrize("spec", ["tasks: 5", "tasks: [tick]", "[1, 2]", "just text"])
def test_a_schedule_of_a_broken_agent_reports_only_the_agent(project, spos, spec):
    """The Agent exists, so the Schedule's reference is fine; its tasks cannot be checked."""
    write(project, "agent.yaml", f"""\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: broken
        spec:
          {spec}
    """)
    write(project, "schedule.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          agent: broken
          task: tick
          cron: "0 * * * *"
    """)
    found = problems(spos("validate", "agents.d"))
    assert found and all(line.startswith("agents.d/agent.yaml:") for line in found)


# ---------------------------------------------------------------- duplicates


def test_duplicate_names_in_one_file(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: small
        spec: {cpu: "10%"}
        ---
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: small
        spec: {cpu: "20%"}
        ---
        apiVersion: spos/v1
        kind: Capability
        metadata:
          name: small
        spec: {}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:10:3: error: duplicate Quota 'small': also defined at agents.d/bad.yaml:1 "
        "(at metadata.name)",
    ]


def test_duplicate_names_across_files_name_the_other_location(examples, spos):
    write(examples, "zz-more-profiles.yaml", """\
        # a second copy of a profile that profiles.yaml already defines
        apiVersion: spos/v1
        kind: Quota
        metadata:
          name: standard
        spec:
          cpu: "50%"
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/zz-more-profiles.yaml:5:3: error: duplicate Quota 'standard': also defined at "
        "agents.d/profiles.yaml:28 (at metadata.name)",
    ]


def test_duplicate_webhook_paths(examples, spos):
    write(examples, "zz-hook.yaml", """\
        apiVersion: spos/v1
        kind: Trigger
        metadata:
          name: second-github-hook
        spec:
          agent: webhook-001
          task: deploy_site
          webhook:
            path: /hooks/github
            secretFile: /etc/systemprompt-os/secrets/other
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/zz-hook.yaml:9:5: error: webhook path '/hooks/github' is already used by Trigger "
        "'webhook-001-github' at agents.d/webhook-001.yaml:36 (at spec.webhook.path)",
    ]


@pytest.mark.parametrize("device", ["/dev/ttyUSB0", "/dev//ttyUSB0", "/dev/./ttyUSB0"])
def test_two_serial_triggers_on_one_device(examples, spos, device):
    """Each byte a serial device sends goes to one reader: two Triggers would split its lines,
    however the second writes the device's path."""
    write(examples, "zz-serial.yaml", f"""\
        apiVersion: spos/v1
        kind: Trigger
        metadata:
          name: second-reader
        spec:
          agent: iot-sensor-001
          task: record_reading
          serial:
            device: {device}
            mode: pattern
            pattern: ALARM
    """)
    found = problems(spos("validate", "agents.d"))
    assert len(found) == 1 and found[0].startswith(
        "agents.d/zz-serial.yaml:9:5: error: serial device '/dev/ttyUSB0' is already read by "
        "Trigger 'iot-sensor-001-serial' at agents.d/iot-sensor-001.yaml:"), found


MQTT_TRIGGER = """\
    apiVersion: spos/v1
    kind: Trigger
    metadata:
      name: {name}
    spec:
      agent: iot-sensor-001
      task: record_reading
      mqtt:
        broker: {broker}
        topic: {topic}
{client}"""


def test_two_mqtt_triggers_with_one_client_id_on_one_broker(examples, spos):
    """A broker drops the older connection when a second one uses its client id: the two
    Triggers would take turns being connected. The broker is compared as the daemon connects
    to it (host case, default port)."""
    write(examples, "zz-mqtt.yaml", MQTT_TRIGGER.format(
        name="alarms", broker="mqtts://Broker.example.net", topic="site/+/alarm",
        client="        clientId: gateway-7\n") + "---\n" + MQTT_TRIGGER.format(
        name="climate", broker="mqtts://broker.example.net:8883/", topic="site/climate",
        client="        clientId: gateway-7\n"))
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/zz-mqtt.yaml:23:9: error: MQTT client id 'gateway-7' on "
        "mqtts://broker.example.net:8883 is already used by Trigger 'alarms' at "
        "agents.d/zz-mqtt.yaml:1 (at spec.mqtt.clientId)\n"
        "    hint: a broker keeps one connection per client id: give each Trigger its own "
        "clientId, or leave it out and let the broker assign one",
    ]


@pytest.mark.parametrize("first, second", [
    ("mqtt://broker.example.net", "mqtt://other.example.net"),  # another broker
    ("mqtt://broker.example.net", "mqtts://broker.example.net"),  # another port
])
def test_one_client_id_on_two_brokers_and_triggers_without_one_are_fine(examples, spos, first, second):
    write(examples, "zz-mqtt.yaml", MQTT_TRIGGER.format(
        name="alarms", broker=first, topic="a", client="        clientId: gateway-7\n")
        + "---\n" + MQTT_TRIGGER.format(name="climate", broker=second, topic="a",
                                         client="        clientId: gateway-7\n")
        + "---\n" + MQTT_TRIGGER.format(name="plain-1", broker=first, topic="a", client="")
        + "---\n" + MQTT_TRIGGER.format(name="plain-2", broker=first, topic="a", client=""))
    result = spos("validate", "agents.d")
    assert result.code == 0 and "39 manifests valid" in result.out, result


# ---------------------------------------------------------------- cron and time zones

SCHEDULE = """\
    apiVersion: spos/v1
    kind: Schedule
    metadata:
      name: probe
    spec:
      agent: probe
      task: tick
      cron: "{cron}"
"""


@pytest.mark.parametrize("cron, message", [
    ("0 * * * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 6"),
    ("0 * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
    ("60 * * * *", "minute field: '60' is outside 0-59"),
    ("0 24 * * *", "hour field: '24' is outside 0-23"),
    ("0 0 0 * *", "day of month field: '0' is outside 1-31"),
    ("0 0 * 13 *", "month field: '13' is outside 1-12"),
    ("0 0 * * 8", "day of week field: '8' is outside 0-7"),
    ("0 0 * jan-mar *",
     "month field: 'jan-mar' is not a valid element (month and weekday names are allowed only alone)"),
    ("0 0 * * mon,fri",
     "day of week field: 'mon' is not a valid element (month and weekday names are allowed only alone)"),
    ("5/10 * * * *", "minute field: a step needs a range or '*', got '5/10'"),
    ("*/0 * * * *", "minute field: step must be at least 1 in '*/0'"),
    ("30-10 * * * *", "minute field: range '30-10' runs backwards"),
    ("1,,2 * * * *", "minute field: '' is not a valid element"),
    ("? * * * *", "minute field: '?' is not a valid element"),
    ("0 0 L * *", "day of month field: 'L' is not a valid element"),
    ("0 0 30 2 *", "never fires: no month it names has a day of month it names"),
    ("@fortnightly", "unknown macro '@fortnightly'; known: @yearly, @annually, @monthly, @weekly, "
                     "@daily, @midnight, @hourly, @reboot"),
    ("@Daily", "unknown macro '@Daily' (macros are lower case); known: @yearly, @annually, "
               "@monthly, @weekly, @daily, @midnight, @hourly, @reboot"),
])
def test_invalid_cron_expressions(project, spos, cron, message):
    write(project, "agent.yaml", AGENT)
    write(project, "bad.yaml", SCHEDULE.format(cron=cron))
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:8:3: error: invalid cron expression {cron!r}: {message} (at spec.cron)",
    ]


@pytest.mark.parametrize("cron", [
    "@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually", "@reboot",
    "*/5 * * * *", "0,15,30,45 * * * *", "0 9-17 * * 1-5", "0-59/10 8-18/2 * * *",
    "30 3 * * 7", "30 3 * * 0", "0 0 29 2 *", "0 8 1,15 * mon", "0 0 * jan *", "0 0 * * SUN",
    "  0 9 * * *  ",
])
def test_valid_cron_expressions(project, spos, cron):
    write(project, "agent.yaml", AGENT)
    write(project, "ok.yaml", SCHEDULE.format(cron=cron))
    assert spos("validate", "agents.d").code == 0


def test_time_zones(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: mars}
        spec: {agent: monitor-001, task: health_check, cron: "0 9 * * *", timeZone: Mars/Olympus}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: path}
        spec: {agent: monitor-001, task: health_check, cron: "0 9 * * *", timeZone: ../../etc/passwd}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: absolute}
        spec: {agent: monitor-001, task: health_check, cron: "0 9 * * *", timeZone: /etc/localtime}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: shell}
        spec: {agent: monitor-001, task: health_check, cron: "0 9 * * *", timeZone: "UTC; reboot"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: unicode}
        spec: {agent: monitor-001, task: health_check, cron: "0 9 * * *", timeZone: "Europe/Zürich"}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: timer}
        spec:
          agent: monitor-001
          task: health_check
          timer: {onCalendar: "*-*-* 09:00:00"}
          timeZone: Europe/Berlin
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: reboot}
        spec: {agent: monitor-001, task: health_check, cron: "@reboot", timeZone: UTC}
        ---
        apiVersion: spos/v1
        kind: Schedule
        metadata: {name: fine}
        spec: {agent: monitor-001, task: health_check, cron: "0 9 * * *", timeZone: America/New_York}
    """)
    hint = "    hint: use an IANA name such as Europe/Berlin or UTC"
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:4:67: error: unknown time zone 'Mars/Olympus' (at spec.timeZone)\n{hint}",
        f"agents.d/bad.yaml:9:67: error: unknown time zone '../../etc/passwd' (at spec.timeZone)\n{hint}",
        f"agents.d/bad.yaml:14:67: error: unknown time zone '/etc/localtime' (at spec.timeZone)\n{hint}",
        f"agents.d/bad.yaml:19:67: error: unknown time zone 'UTC; reboot' (at spec.timeZone)\n{hint}",
        f"agents.d/bad.yaml:24:67: error: unknown time zone 'Europe/Zürich' (at spec.timeZone)\n{hint}",
        "agents.d/bad.yaml:33:3: error: timeZone is only allowed together with cron (at spec.timeZone)\n"
        "    hint: for a timer, write the zone inside onCalendar, e.g. '*-*-* 09:00 Europe/Berlin'",
        "agents.d/bad.yaml:38:65: error: timeZone has no meaning for @reboot (at spec.timeZone)",
    ]


def test_calendar_events_cannot_carry_systemd_specifiers(examples, spos):
    write(examples, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Schedule
        metadata:
          name: probe
        spec:
          agent: monitor-001
          task: health_check
          timer:
            onCalendar: ["*-*-* 09:00:00", "%H:00"]
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:9:36: error: '%H:00' contains '%' (at spec.timer.onCalendar[1])\n"
        "    hint: systemd reads '%' in a unit file as a specifier; calendar events never need one",
    ]


# ---------------------------------------------------------------- strings that could inject


def test_control_characters_are_refused_wherever_they_are(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
          annotations: {note: "ok\\ttabs are fine"}
        spec:
          description: "first line\\nsecond line"
          env:
            TOKEN: "abc\\0def"
          tasks:
            tick:
              command: ["/bin/echo", "hi\\n* * * * * root /tmp/evil"]
              description: |
                a block scalar ends in a newline
    """)
    hint = "    hint: newlines and NUL could inject lines into crontab or unit files; write one line"
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:7:3: error: control characters ('\\n') are not allowed in manifest "
        f"strings (at spec.description)\n{hint}",
        f"agents.d/bad.yaml:9:5: error: control characters ('\\x00') are not allowed in manifest "
        f"strings (at spec.env.TOKEN)\n{hint}",
        f"agents.d/bad.yaml:12:30: error: control characters ('\\n') are not allowed in manifest "
        f"strings (at spec.tasks.tick.command[1])\n{hint}",
        f"agents.d/bad.yaml:13:7: error: control characters ('\\n') are not allowed in manifest "
        f"strings (at spec.tasks.tick.description)\n{hint}",
    ]


def test_unicode_line_breaks_are_refused_like_newlines(project, spos):
    """U+0085 (NEL), U+2028 and U+2029 end a line for some readers (Python's splitlines among
    them), so a path holding one rendered into a unit or crontab could split it."""
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          description: "one\\u2028two"
          env:
            A: "x\\x85y"
            B: "p\\u2029q"
            C: "accents, é and ü, are fine"
          tasks:
            tick:
              command: ["/bin/true"]
    """)
    hint = "    hint: newlines and NUL could inject lines into crontab or unit files; write one line"
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:6:3: error: control characters ('\\u2028') are not allowed in "
        f"manifest strings (at spec.description)\n{hint}",
        f"agents.d/bad.yaml:8:5: error: control characters ('\\x85') are not allowed in "
        f"manifest strings (at spec.env.A)\n{hint}",
        f"agents.d/bad.yaml:9:5: error: control characters ('\\u2029') are not allowed in "
        f"manifest strings (at spec.env.B)\n{hint}",
    ]


def test_percent_signs_and_specifiers_in_commands_are_data(project, spos):
    """Commands reach only the compiled agent.json, never a crontab or unit file."""
    write(project, "ok.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            tick:
              command: ["/bin/date", "+%Y-%m-%d %H:%M", "%n%i", "$(reboot)", "; rm -rf /"]
    """)
    assert spos("validate", "agents.d").code == 0


# ---------------------------------------------------------------- whole files and documents


def test_a_document_that_is_a_list_or_a_scalar(project, spos):
    write(project, "bad.yaml", """\
        - apiVersion: spos/v1
          kind: Quota
        ---
        just a sentence
        ---
        42
    """)
    message = "error: a manifest must be a mapping with apiVersion, kind, metadata and spec"
    assert problems(spos("validate", "agents.d")) == [
        f"agents.d/bad.yaml:1:1: {message}",
        f"agents.d/bad.yaml:4:1: {message}",
        f"agents.d/bad.yaml:6:1: {message}",
    ]


def test_wrong_or_missing_api_version(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v2
        kind: Quota
        metadata: {name: a}
        spec: {}
        ---
        kind: Quota
        metadata: {name: b}
        spec: {}
        ---
        apiVersion: v1
        kind: ConfigMap
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:1:1: error: apiVersion must be 'spos/v1', got 'spos/v2' (at apiVersion)",
        "agents.d/bad.yaml:6:1: error: apiVersion must be 'spos/v1', got None (at apiVersion)",
        "agents.d/bad.yaml:10:1: error: apiVersion must be 'spos/v1', got 'v1' (at apiVersion)",
    ]


def test_unknown_kind(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Schedul
        metadata: {name: a}
        spec: {}
        ---
        apiVersion: spos/v1
        kind: agent
        metadata: {name: b}
        spec: {}
        ---
        apiVersion: spos/v1
        kind: CronJob
        metadata: {name: c}
        spec: {}
    """)
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/bad.yaml:2:1: error: unknown kind 'Schedul' (at kind)\n"
        "    hint: did you mean 'Schedule'?",
        "agents.d/bad.yaml:7:1: error: unknown kind 'agent' (at kind)\n"
        "    hint: did you mean 'Agent'?",
        "agents.d/bad.yaml:12:1: error: unknown kind 'CronJob' (at kind)\n"
        "    hint: kinds: Agent, Schedule, Trigger, Quota, Capability, Policy",
    ]


def test_a_file_that_is_not_utf8(project, spos):
    (project / "agents.d" / "latin1.yaml").write_bytes(
        b"apiVersion: spos/v1\nkind: Quota\nmetadata: {name: caf\xe9}\nspec: {}\n")
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/latin1.yaml:1:1: error: file is not valid UTF-8",
    ]


def test_a_policy_among_the_manifests_and_an_agent_among_the_policies(examples, spos):
    shutil.copy(BAD / "misplaced" / "agents.d" / "policy.yaml", examples / "agents.d")
    shutil.copy(BAD / "misplaced" / "policies" / "agent.yaml", examples / "policies")
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/policy.yaml:4:1: error: Policy documents belong in policies/ (at kind)",
        "policies/agent.yaml:4:1: error: Agent documents belong in the manifests directory (at kind)",
    ]


def test_every_problem_of_every_file_is_reported_at_once_sorted_by_file_and_line(
        tmp_path, monkeypatch, spos):
    shutil.copytree(BAD / "many-problems", tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    assert problems(spos("validate", "agents.d")) == [
        "agents.d/a-agent.yaml:11:7: error: unknown field 'timout' (at spec.tasks.tick.timout)\n"
        "    hint: did you mean 'timeout'?",
        "agents.d/a-agent.yaml:12:7: error: 'forbid' is not one of Allow, Forbid, Replace, Queue "
        "(at spec.tasks.tick.concurrency)\n"
        "    hint: did you mean 'Forbid'?",
        "agents.d/a-agent.yaml:22:3: error: Quota 'tiny' does not exist (at spec.quota)\n"
        "    hint: defined: small",
        "agents.d/b-schedules.yaml:8:3: error: invalid cron expression '0 25 * * *': hour field: "
        "'25' is outside 0-23 (at spec.cron)",
        "agents.d/b-schedules.yaml:16:3: error: Agent 'worker' has no task 'tock' (at spec.task)\n"
        "    hint: did you mean 'tick'?",
        "agents.d/b-schedules.yaml:18:5: error: fires every 30s, more often than the minimum "
        "interval 1m of policy 'guardrails' (policies/guardrails.yaml:1) "
        "(at spec.timer.onUnitActiveSec)",
        "agents.d/nested/c-profiles.yaml:4:3: error: duplicate Quota 'small': also defined at "
        "agents.d/a-agent.yaml:24 (at metadata.name)",
        "agents.d/nested/c-profiles.yaml:6:3: error: memory 16G is above the ceiling 8G of policy "
        "'guardrails' (policies/guardrails.yaml:1) (at spec.memory)",
        "agents.d/nested/d-broken.yaml:7:2: error: invalid YAML: while parsing a block mapping "
        "did not find expected key",
    ]


def test_json_output_of_problems(project, spos):
    write(project, "bad.yaml", """\
        apiVersion: spos/v1
        kind: Agent
        metadata:
          name: probe
        spec:
          tasks:
            tick:
              command: ["/bin/true"]
              concurrency: forbid
    """)
    result = spos("validate", "agents.d", "--json")
    assert (result.code, result.err) == (1, "")
    assert json.loads(result.out) == {
        "valid": False,
        "diagnostics": [
            {
                "severity": "error",
                "file": "agents.d/bad.yaml",
                "line": 9,
                "col": 7,
                "field": "spec.tasks.tick.concurrency",
                "summary": "'forbid' is not one of Allow, Forbid, Replace, Queue",
                "hint": "did you mean 'Forbid'?",
            }
        ],
    }


def test_policies_come_from_beside_the_manifests_or_from_policies(examples, spos, tmp_path):
    write(examples, "probe.yaml", AGENT)  # no capability or quota: the baseline requires both
    beside = problems(spos("validate", "agents.d"))
    assert [line.split(": error: ")[1] for line in beside] == [
        "every Agent must name a capability (policy 'baseline' (policies/baseline.yaml:4)) (at spec)"
        "\n    hint: add spec.capability",
        "every Agent must name a quota (policy 'baseline' (policies/baseline.yaml:4)) (at spec)"
        "\n    hint: add spec.quota",
    ]
    (tmp_path / "no-policies").mkdir()
    assert spos("validate", "agents.d", "--policies", tmp_path / "no-policies").code == 0


def test_a_policies_directory_that_was_named_must_exist(examples, spos):
    """Otherwise a typo in --policies would silently switch every guardrail off."""
    assert problems(spos("validate", "agents.d", "--policies", "polices")) == [
        "polices:1:1: error: policies directory does not exist",
    ]


def test_a_missing_manifests_directory_or_a_file_instead(project, spos):
    assert problems(spos("validate", "nowhere")) == [
        "nowhere:1:1: error: manifests directory does not exist",
    ]
    write(project, "probe.yaml", AGENT)
    assert problems(spos("validate", "agents.d/probe.yaml")) == [
        "agents.d/probe.yaml:1:1: error: expected the manifests directory, got a file",
    ]
