"""The `spos` command line. The only place that prints or chooses exit codes.

Exit codes follow Terraform's habits: 0 success, 1 error; `plan --detailed-exitcode` returns 2
when there are changes. Commands that cron runs every minute (`action run`) import only what
they need, so heavy modules are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "root"):
        args.root = "/"
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    from reconciler.errors import ManifestError, SposError

    try:
        return args.handler(args)
    except ManifestError as exc:
        return _report_diagnostics(exc, getattr(args, "json", False))
    except SposError as exc:
        print(f"spos: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`spos plan --json | head`): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        print(f"spos: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("spos: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    # --root is accepted before or after any command word. The option is shared between the
    # parsers, so its default must stay SUPPRESS: a real default would let a later command word
    # overwrite a --root given before it. main() fills in "/" when it is absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root", default=argparse.SUPPRESS, metavar="DIR",
        help="the device's file system root (default /); spos state lives in "
             "DIR/var/lib/systemprompt-os",
    )
    parser = argparse.ArgumentParser(
        prog="spos", parents=[common],
        description="Converge this device to the agents, schedules and limits declared in git.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    validate = commands.add_parser(
        "validate", parents=[common], help="check manifests: schemas, references, policies",
        description="Check every manifest under DIR. Prints each problem as FILE:LINE:COL; "
                    "exit 0 when valid, 1 otherwise.",
    )
    _manifest_args(validate)
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.set_defaults(handler=_validate)

    plan = commands.add_parser(
        "plan", parents=[common], help="show what apply would change",
        description="Compare the manifests with the device and show the changes apply would make.",
    )
    _manifest_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("-out", "--out", dest="out", metavar="FILE", help="save the plan for `spos apply FILE`")
    plan.add_argument(
        "--detailed-exitcode", action="store_true",
        help="exit 0 when there are no changes, 1 on error, 2 when there are changes",
    )
    plan.add_argument("--allow-empty", action="store_true", help="allow an empty manifest set to delete everything")
    plan.set_defaults(handler=_plan)

    apply = commands.add_parser(
        "apply", parents=[common], help="make the device match the manifests (or a saved plan)",
        description="Apply a saved plan exactly, or plan DIR and apply it after confirmation.",
    )
    _manifest_args(apply, what="manifests directory, or a plan saved with plan -out")
    apply.add_argument("--auto-approve", action="store_true", help="apply without asking")
    apply.add_argument("--allow-empty", action="store_true", help="allow an empty manifest set to delete everything")
    apply.add_argument("--lock-timeout", default="0s", metavar="DURATION",
                       help="wait this long for another apply to finish (default: fail at once)")
    apply.add_argument("--json", action="store_true", help="print the applied plan and results as JSON")
    apply.set_defaults(handler=_apply)

    action = commands.add_parser("action", parents=[common], help="work with actions (runs of tasks)")
    action_commands = action.add_subparsers(title="action commands", metavar="COMMAND")
    run = action_commands.add_parser(
        "run", parents=[common], help="enqueue one run of a task (what cron calls)",
        description="Put one run of AGENT's TASK in the agent's queue and print its run id.",
    )
    run.add_argument("--agent", required=True)
    run.add_argument("--task", required=True)
    run.add_argument("--priority", type=int, help="0-100; default: the task's priority")
    run.add_argument("--schedule", metavar="NAME", help="the Schedule that fired (recorded as the source)")
    run.add_argument("--deadline", metavar="DURATION", help="drop the run if it cannot start within this")
    run.add_argument("--cron", metavar="EXPR", help="enqueue only if EXPR matches now in --cron-tz")
    run.add_argument("--cron-tz", metavar="ZONE", help="the time zone EXPR is written in")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="print nothing on success (cron mails whatever a job prints)")
    run.set_defaults(handler=_action_run)
    return parser


def _manifest_args(parser: argparse.ArgumentParser, what: str = "manifests directory") -> None:
    parser.add_argument("path", nargs="?", default="agents.d", metavar="DIR", help=f"{what} (default agents.d)")
    parser.add_argument(
        "--policies", metavar="DIR",
        help="policy directory (default: policies/ beside DIR, when it exists)",
    )


def _policy_dir(args) -> str | None:
    if args.policies:
        return args.policies
    beside = os.path.join(os.path.dirname(os.path.abspath(args.path)), "policies")
    return beside if os.path.isdir(beside) else None


def _validate(args) -> int:
    import json

    from reconciler.validate import load

    manifests = load(args.path, _policy_dir(args))
    if args.json:
        print(json.dumps({"valid": True, "manifests": len(manifests), "diagnostics": []}, indent=2))
    else:
        print(f"{args.path}: {len(manifests)} manifests valid.")
    return EXIT_OK


def _report_diagnostics(exc, as_json: bool) -> int:
    import json

    from reconciler.views import diagnostics_text

    diagnostics = [d.to_json() for d in exc.diagnostics]
    if as_json:
        print(json.dumps({"valid": False, "diagnostics": diagnostics}, indent=2))
    else:
        sys.stderr.write(diagnostics_text(diagnostics))
    return EXIT_ERROR


def _stage(args, text: str) -> None:
    if not getattr(args, "json", False):
        print(text, file=sys.stderr)


def _make_plan(args):
    from reconciler import __version__
    from reconciler.device import Device
    from reconciler.errors import UsageError
    from reconciler.observe import observe
    from reconciler.plan import plan
    from reconciler.render import notices, render
    from reconciler.resource import Facts
    from reconciler.state import cache_file, read_inventory
    from reconciler.validate import load

    device = Device(args.root)
    if not os.path.isdir(args.path):
        raise UsageError(f"{args.path}: no such manifests directory")
    _stage(args, f"Loading manifests from {args.path}...")
    manifests = load(args.path, _policy_dir(args), cache_file(device))
    manifests.revision = _git_revision(args.path)
    inventory = read_inventory(device)["resources"]
    declared = sum(1 for m in manifests.manifests if m.kind != "Policy")
    if not declared and inventory and not args.allow_empty:
        raise UsageError(
            f"{args.path} holds no manifests: applying it would delete all {len(inventory)} "
            "resources spos manages here. Pass --allow-empty if that is what you want."
        )
    desired = render(manifests, Facts(spos_command=_spos_command(), root=str(device.root)))
    _stage(args, "Observing the device...")
    actual = observe(device, set(desired) | set(inventory))
    _stage(args, "Planning...")
    result = plan(
        desired, actual, inventory,
        root=str(device.root),
        manifests={"path": args.path, "revision": manifests.revision, "digest": manifests.digest},
        version=__version__,
    )
    result.notices = notices(manifests)
    return device, result


def _plan(args) -> int:
    import json

    from reconciler.views import plan_text

    _, result = _make_plan(args)
    data = result.to_json()
    if args.out:
        _save_plan(args.out, data)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(plan_text(data))
        if args.out:
            print(f"\nSaved the plan to {args.out}. Apply exactly this with: spos apply {args.out}")
    if args.detailed_exitcode and result.has_changes:
        return EXIT_CHANGES
    return EXIT_OK


def _save_plan(path: str, data: dict) -> None:
    import json

    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "w") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(temp, path)


def _apply(args) -> int:
    import json

    from reconciler.apply import apply
    from reconciler.device import Device
    from reconciler.errors import UsageError
    from reconciler.resource import Plan
    from reconciler.units import seconds
    from reconciler.views import apply_line, plan_text

    try:
        lock_timeout = seconds(args.lock_timeout)
    except ValueError as exc:
        raise UsageError(f"--lock-timeout: {exc}") from None
    if os.path.isfile(args.path):
        device = Device(args.root)
        try:
            with open(args.path) as handle:
                planned = Plan.from_json(json.load(handle))
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"{args.path}: not a saved spos plan ({exc})") from None
        if planned.root != str(device.root):
            raise UsageError(f"{args.path} was planned for root {planned.root}, not {device.root}")
    else:
        device, planned = _make_plan(args)
        if not args.json:
            sys.stdout.write(plan_text(planned.to_json()))
        if not planned.has_changes:
            return EXIT_OK
        if not args.auto_approve and not _confirm():
            print("Apply cancelled; nothing was changed.", file=sys.stderr)
            return EXIT_ERROR
    _stage(args, "Applying...")

    def progress(change, error):
        if not args.json:
            print(apply_line(change.to_json(), error))

    result = apply(device, planned, lock_timeout=lock_timeout, progress=progress)
    if args.json:
        print(json.dumps({
            "plan": planned.to_json(),
            "applied": [c.id for c in result.applied],
            "failed": [{"id": c.id, "error": e} for c, e in result.failed],
        }, indent=2, ensure_ascii=False))
    else:
        print(f"Apply complete: {len(result.applied)} changed, {len(result.failed)} failed.")
    return EXIT_OK if result.ok else EXIT_ERROR


def _confirm() -> bool:
    if not sys.stdin.isatty():
        from reconciler.errors import UsageError

        raise UsageError("input is not a terminal: pass --auto-approve to apply without asking")
    answer = input("\nApply these changes? Only 'yes' applies: ")
    return answer.strip() == "yes"


def _action_run(args) -> int:
    from reconciler.device import Device
    from reconciler.errors import UsageError
    from reconciler.executor.enqueue import enqueue

    if (args.cron is None) != (args.cron_tz is None):
        raise UsageError("--cron and --cron-tz go together")
    if args.cron is not None and not _cron_matches_now(args.cron, args.cron_tz):
        return EXIT_OK
    deadline = None
    if args.deadline:
        from reconciler.units import seconds

        try:
            deadline = seconds(args.deadline)
        except ValueError as exc:
            raise UsageError(f"--deadline: {exc}") from None
    source = {"kind": "schedule", "name": args.schedule} if args.schedule else {"kind": "manual"}
    record = enqueue(
        Device(args.root), args.agent, args.task,
        priority=args.priority, source=source, deadline_seconds=deadline,
    )
    if not args.quiet:
        print(record["id"])
    return EXIT_OK


def _cron_matches_now(expression: str, zone: str) -> bool:
    import zoneinfo
    from datetime import datetime

    from reconciler import cronexpr
    from reconciler.errors import UsageError

    try:
        tz = zoneinfo.ZoneInfo(zone)
        parsed = cronexpr.parse(expression)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise UsageError(f"--cron/--cron-tz: {exc}") from None
    return parsed.matches(datetime.now(tz))


def _spos_command() -> tuple[str, ...]:
    """How cron and systemd reach this spos: $SPOS_COMMAND, else this very executable."""
    override = os.environ.get("SPOS_COMMAND")
    if override:
        import shlex

        return tuple(shlex.split(override))
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "spos" and os.path.isfile(script):
        return (script,)
    return (sys.executable, "-m", "reconciler")


def _git_revision(path: str) -> str | None:
    """The commit the manifests come from, with `-dirty` when they differ from it."""
    import subprocess

    def git(*words):
        return subprocess.run(
            ["git", "-C", path, *words], capture_output=True, text=True, timeout=30,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )

    try:
        head = git("rev-parse", "--verify", "-q", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=normal", "--", ".").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")
