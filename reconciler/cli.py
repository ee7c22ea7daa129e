"""The `spos` command line. The only place that prints or chooses exit codes.

Exit codes follow Terraform's habits: 0 success, 1 error; `plan --detailed-exitcode` returns 2
when there are changes. Commands that cron runs every minute (`action run`) import only what
they need, so heavy modules are imported inside the command functions.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself is a cost on the every-minute enqueue path
if TYPE_CHECKING:
    import argparse

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
EXIT_WAIT_TIMEOUT, EXIT_INTERRUPTED = 124, 130  # `action run --wait` gave up / was interrupted
MAX_DURATION = 10 * 365 * 86400.0  # seconds; longer durations on the command line are mistakes
REDELIVER_DELAY = 0.005  # seconds; see _redeliver


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error: argparse's 2 would read as
        return EXIT_OK if exc.code in (0, None) else EXIT_ERROR  # "changes" to `plan --detailed-exitcode`
    if not hasattr(args, "root"):
        args.root = "/"
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    with _interruptible():
        return guarded(lambda: _run_with_feedback(args), as_json=getattr(args, "json", False))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, as spos raises it: caught wherever KeyboardInterrupt is.

    Not KeyboardInterrupt itself: CPython remembers a KeyboardInterrupt raised inside code it
    runs from a string (dataclasses and namedtuples build their methods so, which a lazy import
    may do at any moment) and then ends the process by SIGINT after main() returned, whatever
    exit code spos chose (`action run --wait` promises 130). It compares the exact type."""


class Terminated(Interrupted):
    """SIGTERM (a supervisor, `timeout`), as spos raises it: the command unwinds as for Ctrl-C,
    so that what it started (a git fetch, say) is stopped with it, and exits 143."""


class _interruptible:
    """SIGINT raises Interrupted, SIGTERM Terminated, while a command runs (in the main thread;
    the previous handlers, and the unraisable hook, are put back after). The daemons install
    their own on top.

    A handler's exception is raised in whatever code runs when the signal arrives; in a
    finalizer or a weakref callback (an import's module lock has one) Python only prints it
    and goes on, and Ctrl-C would be lost. `_redeliver` sees it there and sends the signal
    again, to be raised in the code that follows."""

    def __enter__(self):
        import signal
        import threading

        self.previous = {}
        self.hook = None
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, _interrupt)
            self.hook = sys.unraisablehook
            sys.unraisablehook = lambda unraisable: _redeliver(unraisable, self.hook)

    def __exit__(self, *_) -> None:
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)
        if self.hook is not None:
            sys.unraisablehook = self.hook


def _interrupt(signum, frame):
    import signal

    raise Terminated() if signum == signal.SIGTERM else Interrupted()


def _redeliver(unraisable, hook) -> None:
    """An Interrupted that Python could not raise (see `_interruptible`): its signal again, sent
    to the main thread REDELIVER_DELAY later by a thread of its own, once the finalizer and this
    hook have returned (a handler run before that raises here, where it is lost too). A signal,
    not a flag: it also ends the system call the main thread may be waiting in."""
    import signal
    import threading
    import time

    if isinstance(unraisable.exc_value, Interrupted):
        number = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        main = threading.main_thread().ident

        def again() -> None:
            time.sleep(REDELIVER_DELAY)
            signal.pthread_kill(main, number)

        threading.Thread(target=again, name="spos-redeliver", daemon=True).start()
    else:
        hook(unraisable)


def _run_with_feedback(args) -> int:
    """Run the command; whatever happens, take down its status line before anything else is said."""
    try:
        return _run(args)
    finally:
        if hasattr(args, "feedback"):
            args.feedback.pause()


def guarded(command, as_json: bool = False) -> int:
    """Run `command` and turn what it raises into a message and an exit code."""
    from reconciler.errors import ManifestError, SposError

    try:
        return command()
    except ManifestError as exc:
        return _report_diagnostics(exc, as_json)
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
    except Terminated:
        print("spos: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("spos: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    """Run the command. Plan, apply and validate build many short-lived objects and end soon:
    at the default thresholds the cyclic garbage collector cost them a third of their time at
    10,000 agents. It runs far less often instead (not never: parsing YAML leaves cycles, and
    without collection a cold validate of 10,000 agents grew to 500 MB)."""
    if args.handler not in (_plan, _apply, _validate):
        return args.handler(args)
    import gc

    thresholds = gc.get_threshold()
    gc.freeze()  # what is loaded by now lives as long as the process: never scan it
    gc.set_threshold(100_000, 20, 20)
    try:
        return args.handler(args)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _parser(argv: list[str] | None = None) -> "argparse.ArgumentParser":
    """The command line parser. Only the command `argv` names is built (all of them when it
    names none, or one spos does not have, so that help and errors list every command):
    building all some 30 parsers costs about 19 ms, more than a small plan spends planning."""
    import argparse

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
    wanted = _command_word(sys.argv[1:] if argv is None else argv)
    for word, add in _COMMANDS.items():
        if wanted not in _COMMANDS or wanted == word:
            add(commands, common)
    return parser


def _command_word(argv: list[str]) -> str | None:
    """The command word of `argv`: its first word, after any --root option. None when anything
    else comes first (`-h`, an abbreviation): the caller then builds every command."""
    words = iter(argv)
    for word in words:
        if word == "--root":
            next(words, None)
        elif not word.startswith("--root="):
            return None if word.startswith("-") else word
    return None


def _add_validate(commands, common) -> None:
    validate = commands.add_parser(
        "validate", parents=[common], help="check manifests: schemas, references, policies",
        description="Check every manifest under DIR. Prints each problem as FILE:LINE:COL; "
                    "exit 0 when valid, 1 otherwise.",
    )
    _manifest_args(validate)
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.set_defaults(handler=_validate)


def _add_plan(commands, common) -> None:
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
    _cgroup_root_arg(plan, device_default=True)
    _device_labels_arg(plan)
    plan.set_defaults(handler=_plan)


def _add_apply(commands, common) -> None:
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
    _cgroup_root_arg(apply, device_default=True)
    _device_labels_arg(apply)
    apply.set_defaults(handler=_apply)


def _add_action(commands, common) -> None:
    action = commands.add_parser("action", parents=[common], help="work with actions (runs of tasks)")
    action_commands = action.add_subparsers(title="action commands", metavar="COMMAND")
    run = action_commands.add_parser(
        "run", parents=[common], help="enqueue one run of a task (what cron calls)",
        description="Put one run of AGENT's TASK in the agent's queue and print its run id.",
    )
    run.add_argument("--agent", required=True)
    run.add_argument("--task", required=True)
    run.add_argument("--priority", type=int, help="0-100; default: the task's priority")
    run.add_argument("--concurrency", choices=("Allow", "Forbid", "Replace", "Queue"),
                     help="for this run, instead of the task's concurrency")
    run.add_argument("--schedule", metavar="NAME", help="the Schedule that fired (recorded as the source)")
    run.add_argument("--deadline", metavar="DURATION", help="drop the run if it cannot start within this")
    run.add_argument("--cron", metavar="EXPR", help="enqueue only if EXPR matches now in --cron-tz")
    run.add_argument("--cron-tz", metavar="ZONE", help="the time zone EXPR is written in")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="print nothing on success (cron mails whatever a job prints)")
    run.add_argument("--wait", action="store_true",
                     help="then wait until the run has ended, retries included, and exit with its "
                          "exit code (as action execute does)")
    run.add_argument("--wait-timeout", metavar="DURATION",
                     help=f"with --wait: stop waiting after this long (exit {EXIT_WAIT_TIMEOUT}); "
                          "the run goes on")
    run.set_defaults(handler=_action_run)

    execute = action_commands.add_parser(
        "execute", parents=[common], help="run a task now, in the foreground, in its sandbox",
        description="Run one task now with the same sandbox, limits and retries the executor "
                    "uses (what a systemd service calls). The exit code is the action's.",
    )
    execute.add_argument("--agent", required=True)
    execute.add_argument("--task", required=True)
    execute.add_argument("--timeout", metavar="DURATION", help="override the task's timeout")
    execute.add_argument("--concurrency", choices=("Allow", "Forbid", "Replace", "Queue"),
                         help="for this run, instead of the task's concurrency")
    _executor_args(execute)
    execute.set_defaults(handler=_action_execute)

    listing = action_commands.add_parser("list", parents=[common], help="list runs")
    listing.add_argument("--agent")
    listing.add_argument("--state", choices=("queued", "active", "completed", "failed", "timeout",
                                             "cancelled", "skipped", "expired"))
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_action_list)

    history = action_commands.add_parser("history", parents=[common], help="finished runs, newest first")
    history.add_argument("--agent")
    history.add_argument("--limit", type=int, default=50)
    history.add_argument("--json", action="store_true")
    history.set_defaults(handler=_action_history)

    show = action_commands.add_parser("show", parents=[common], help="one run: state, attempts, timings, why")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_action_show)

    logs = action_commands.add_parser("logs", parents=[common], help="a run's output")
    logs.add_argument("run_id", metavar="RUN_ID")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    logs.set_defaults(handler=_action_logs)

    cancel = action_commands.add_parser("cancel", parents=[common], help="cancel a queued or running run")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.set_defaults(handler=_action_cancel)

    cleanup = action_commands.add_parser(
        "cleanup", parents=[common], help="remove finished runs past their Quota's retention",
        description="Remove the records, logs, checkpoints and temporary directories of finished "
                    "runs older than their agent's retention (the executor does this hourly).",
    )
    cleanup.add_argument("--agent", help="only this agent's runs")
    cleanup.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    cleanup.add_argument("--json", action="store_true", help="print the report as JSON")
    cleanup.set_defaults(handler=_action_cleanup)

    resources = action_commands.add_parser(
        "resources", parents=[common], help="what each agent uses now against its Quota",
        description="Per agent: CPU time, memory now and at peak, processes and I/O of its "
                    "cgroup, temp and output storage, each next to its Quota's limit, and its "
                    "runs queued, active, completed and failed. What cannot be measured shows "
                    "as '-' (null in JSON).",
    )
    _cgroup_root_arg(resources, device_default=True)
    resources.add_argument("--json", action="store_true", help="print the report as JSON")
    resources.set_defaults(handler=_action_resources)

    monitor = action_commands.add_parser(
        "monitor", parents=[common], help="active runs, progress, CPU, memory, queue depth per agent",
        description="What every agent is doing now: its active runs with their progress, CPU, "
                    "memory and runtime, and how many runs wait. Prints one snapshot, or with "
                    "--live a full-screen view refreshed until q or Ctrl-C.",
    )
    monitor.add_argument("--agent", help="only this agent")
    monitor.add_argument("--live", action="store_true", help="full-screen view, refreshed every --interval")
    monitor.add_argument("--interval", default="1s", metavar="DURATION",
                         help="with --live: how often the view is refreshed (default 1s)")
    _cgroup_root_arg(monitor, device_default=True)
    monitor.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    monitor.set_defaults(handler=_action_monitor)

    watch = action_commands.add_parser(
        "watch", parents=[common], help="follow an agent's runs and their logs as they happen",
        description="Print AGENT's runs as they are queued, start, retry and end, with their "
                    "output, until Ctrl-C.",
    )
    watch.add_argument("--agent", required=True)
    watch.add_argument("--json", action="store_true",
                       help="one JSON object a line: run events and output lines")
    watch.set_defaults(handler=_action_watch)


def _add_executor(commands, common) -> None:
    executor = commands.add_parser(
        "executor", parents=[common], help="the daemon that runs queued actions",
        description="Run queued actions in their sandboxes until stopped. SIGTERM drains: no new "
                    "runs start, active ones finish.",
    )
    executor.add_argument("--once", action="store_true", help="return when nothing is queued or running")
    executor.add_argument("--max-parallel", type=int, default=4, metavar="N", help="runs at once (default 4)")
    executor.add_argument("--max-per-agent", type=int, default=2, metavar="N",
                          help="runs of one agent at once (default 2)")
    executor.add_argument("--prepared", type=int, default=4, metavar="N",
                          help="keep a sandbox set up ahead for each of up to N recently active "
                               "agents, so their next run starts sooner (default 4; 0: none)")
    executor.add_argument("--rescan", default="5m", metavar="DURATION",
                          help="look at every queue this often even without a wake-up (default "
                               "5m; at most 30s while some queue cannot be watched with inotify)")
    executor.add_argument("--cleanup-interval", default="1h", metavar="DURATION",
                          help="remove finished runs past their retention at start and this often "
                               "(default 1h; 0s: never)")
    _executor_args(executor)
    executor.set_defaults(handler=_executor)


def _add_triggers(commands, common) -> None:
    triggers = commands.add_parser(
        "triggers", parents=[common], help="the daemon that turns events into queued actions",
        description="Watch for every registered trigger's events (files, webhooks, serial "
                    "devices, conditions, MQTT, intervals) and queue their actions. Registrations "
                    "changed by apply are reloaded without a restart. SIGTERM stops it; an open "
                    "debounce window is queued first.",
    )
    triggers.add_argument("--listen", default="127.0.0.1:9180", metavar="ADDRESS:PORT",
                          help="where webhook triggers are served (default 127.0.0.1:9180)")
    triggers.add_argument("--reload-interval", default="500ms", metavar="DURATION",
                          help="where inotify cannot watch the registrations, look for "
                               "changed ones this often (default 500ms)")
    triggers.add_argument("--heartbeat", default="30s", metavar="DURATION",
                          help="when nothing changes, rewrite the status and look at the "
                               "registrations this often (default 30s, from 1s to 1h)")
    triggers.set_defaults(handler=_triggers)


def _add_sync(commands, common) -> None:
    sync = commands.add_parser(
        "sync", parents=[common], help="pull the manifests repository and converge to it, once",
        description="Fetch BRANCH of the repository, verify it, validate, plan and apply it. A "
                    "revision refused at any step is quarantined: the last applied revision stays "
                    "in force, and the refused one is not tried again until a new commit.",
    )
    _sync_args(sync)
    sync.add_argument("--json", action="store_true", help="print the result as JSON")
    sync.set_defaults(handler=_sync)


def _add_daemon(commands, common) -> None:
    daemon = commands.add_parser(
        "daemon", parents=[common], help="sync on an interval, repair drift, run the executor and triggers",
        description="The device's always-on agent: sync every INTERVAL (plus up to JITTER), put "
                    "back managed files changed by hand between syncs, and run spos executor and "
                    "spos triggers as supervised children. SIGTERM stops it cleanly.",
    )
    _sync_args(daemon)
    daemon.add_argument("--interval", default="60s", metavar="DURATION", help="between syncs (default 60s)")
    daemon.add_argument("--jitter", default="10s", metavar="DURATION",
                        help="up to this much more, chosen at random each time (default 10s)")
    daemon.add_argument("--drift-interval", default="60s", metavar="DURATION",
                        help="look for drift this often between syncs (default 60s)")
    daemon.add_argument("--no-executor", action="store_true", help="do not run spos executor")
    daemon.add_argument("--no-triggers", action="store_true", help="do not run spos triggers")
    daemon.add_argument("--stop-timeout", default="30s", metavar="DURATION",
                        help="after SIGTERM, wait this long for the children to stop (default 30s)")
    daemon.set_defaults(handler=_daemon)


def _add_install(commands, common) -> None:
    install = commands.add_parser(
        "install", parents=[common], help="run spos daemon at boot (systemd unit or cron fallback)",
        description="Write /etc/systemd/system/spos.service (where systemd is the init system) "
                    "or, with --cron, /etc/cron.d/spos, which start spos daemon for REPO; where "
                    "systemd runs and the root is /, enable and start the service.",
    )
    _sync_args(install, repo_required=False)  # not with --remove
    install.add_argument("--interval", default="60s", metavar="DURATION", help="between syncs (default 60s)")
    install.add_argument("--jitter", default="10s", metavar="DURATION", help="random extra wait (default 10s)")
    way = install.add_mutually_exclusive_group()
    way.add_argument("--systemd", action="store_true", help="a systemd service (default where systemd runs)")
    way.add_argument("--cron", action="store_true", help="the cron fallback: the daemon at boot, a sync every 15 minutes")
    install.add_argument("--remove", action="store_true", help="remove what install wrote (and stop the service)")
    install.add_argument("--dry-run", action="store_true", help="show the files; change nothing")
    install.set_defaults(handler=_install)


def _add_status(commands, common) -> None:
    status = commands.add_parser(
        "status", parents=[common], help="the applied revision, the last sync, drift, daemons",
        description="What the device runs and how its loops are doing: the applied revision and "
                    "when, the last sync and why it failed, quarantined revisions, drift repairs, "
                    "and whether the daemon, executor and trigger daemon run.",
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)


def _add_metrics(commands, common) -> None:
    metrics = commands.add_parser(
        "metrics", parents=[common], help="Prometheus metrics: runs, durations, queue, triggers, syncs",
        description="Print the device's metrics in the Prometheus text format, serve them over "
                    "HTTP (--listen), or keep a node_exporter textfile up to date (--textfile).",
    )
    where = metrics.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="ADDRESS:PORT", help="serve /metrics here (e.g. 127.0.0.1:9108)")
    where.add_argument("--textfile", metavar="PATH", help="write the metrics to PATH atomically, every --interval")
    metrics.add_argument("--interval", default="15s", metavar="DURATION",
                         help="with --textfile: how often it is rewritten (default 15s)")
    metrics.add_argument("--once", action="store_true", help="with --textfile: write it once and exit")
    metrics.set_defaults(handler=_metrics)


def _add_schedule(commands, common) -> None:
    schedule = commands.add_parser("schedule", parents=[common], help="what the Schedules will do")
    schedule_commands = schedule.add_subparsers(title="schedule commands", metavar="COMMAND")
    schedule_next = schedule_commands.add_parser(
        "next", parents=[common], help="the next fire times of every Schedule",
        description="The next fire times of every Schedule in DIR, and what catch-up and overlap "
                    "policy would do with them.",
    )
    _schedule_args(schedule_next)
    schedule_next.add_argument("-n", "--count", type=int, default=5, metavar="N",
                               help="fire times per Schedule (default 5)")
    schedule_next.add_argument("--json", action="store_true")
    schedule_next.set_defaults(handler=_schedule_next)
    schedule_suggest = schedule_commands.add_parser(
        "suggest", parents=[common], help="quieter times for flexible tasks, as a diff to commit",
        description="From the device's run history and sampled load, find its quiet hours and "
                    "propose moved cron times for the Schedules of tasks marked flexible. Prints "
                    "a diff of DIR's manifests; nothing is changed.",
    )
    _schedule_args(schedule_suggest)
    schedule_suggest.add_argument("--json", action="store_true")
    schedule_suggest.set_defaults(handler=_schedule_suggest)


def _add_why(commands, common) -> None:
    why = commands.add_parser(
        "why", parents=[common], help="where a run came from: source, revision, config, limits, lineage",
        description="The provenance of run RUN_ID: the schedule, trigger or command that started "
                    "it, the git revision and agent config it ran under, the capabilities and "
                    "limits in force, and every attempt of its retry lineage.",
    )
    why.add_argument("run_id", metavar="RUN_ID")
    why.add_argument("--json", action="store_true")
    why.set_defaults(handler=_why)


def _add_trigger(commands, common) -> None:
    trigger = commands.add_parser("trigger", parents=[common], help="inspect and test triggers")
    trigger_commands = trigger.add_subparsers(title="trigger commands", metavar="COMMAND")
    trigger_list = trigger_commands.add_parser(
        "list", parents=[common], help="registrations, their state, last fired, counts")
    trigger_list.add_argument("--json", action="store_true")
    trigger_list.set_defaults(handler=_trigger_list)
    trigger_test = trigger_commands.add_parser(
        "test", parents=[common], help="fire one trigger by hand and show what was queued",
        description="Fire trigger NAME with one test event, as its source would, and show the "
                    "run queued. Debounce and rate limit are bypassed; concurrency Forbid applies.",
    )
    trigger_test.add_argument("name", metavar="NAME")
    trigger_test.add_argument("--payload", metavar="FILE", help="hand the run this file's content as its payload")
    trigger_test.add_argument("--dry-run", action="store_true", help="show what would be queued; queue nothing")
    trigger_test.add_argument("--json", action="store_true")
    trigger_test.set_defaults(handler=_trigger_test)


_COMMANDS = {
    "validate": _add_validate,
    "plan": _add_plan,
    "apply": _add_apply,
    "action": _add_action,
    "executor": _add_executor,
    "triggers": _add_triggers,
    "sync": _add_sync,
    "daemon": _add_daemon,
    "install": _add_install,
    "status": _add_status,
    "metrics": _add_metrics,
    "schedule": _add_schedule,
    "why": _add_why,
    "trigger": _add_trigger,
}
"""Each top-level command word and what adds its parser, in the order help lists them."""


def _schedule_args(parser: "argparse.ArgumentParser") -> None:
    parser.add_argument("path", nargs="?", default="agents.d", metavar="DIR",
                        help="manifests directory (default agents.d)")
    parser.add_argument("--agent", help="only this agent's Schedules")


def _cgroup_root_arg(parser: "argparse.ArgumentParser", device_default: bool = False) -> None:
    if device_default:  # agents' cgroups are part of the device: under --root unless told
        parser.add_argument("--cgroup-root", metavar="DIR",
                            help="where the agents' cgroups are managed (default ROOT/sys/fs/cgroup: "
                                 "/sys/fs/cgroup on a real device)")
        return
    parser.add_argument("--cgroup-root", default="/sys/fs/cgroup", metavar="DIR",
                        help="where cgroups are mounted (default /sys/fs/cgroup)")


def _device_labels_arg(parser: "argparse.ArgumentParser") -> None:
    parser.add_argument("--device-labels", metavar="KEY=VALUE,...",
                        help="plan for a device with exactly these labels (spos.dev/ ones "
                             "included) instead of this device's labels file and facts")


def _sync_args(parser: "argparse.ArgumentParser", repo_required: bool = True) -> None:
    source = parser.add_mutually_exclusive_group(required=repo_required)
    source.add_argument("--repo", metavar="URL",
                        help="the manifests repository: https://, ssh://, git@host:path, file:// or a path")
    source.add_argument("--repo-file", metavar="FILE",
                        help="read the repository URL from FILE (its one line that is not empty "
                             "or a # comment), so that a password or token in it shows in no "
                             "process listing; with one, FILE must be readable by its owner alone")
    parser.add_argument("--branch", default="main", help="the branch to follow (default main)")
    parser.add_argument("--path", default="agents.d", metavar="DIR",
                        help="the manifests directory in the repository (default agents.d)")
    parser.add_argument("--policies", default="policies", metavar="DIR",
                        help="the policy directory in the repository (default policies)")
    parser.add_argument("--verify-signatures", metavar="KEYRING",
                        help="take only commits signed by a key in this file of public keys")
    parser.add_argument("--allow-force-push", action="store_true",
                        help="take a commit that does not descend from the applied one")
    _device_labels_arg(parser)
    _cgroup_root_arg(parser, device_default=True)


def _sync_options(args):
    from reconciler.sync import SyncOptions

    return SyncOptions(
        repo=_repository(args), branch=args.branch, path=args.path, policies=args.policies,
        keyring=args.verify_signatures, allow_force=args.allow_force_push,
        device_labels=args.device_labels, cgroup_root=args.cgroup_root,
    )


def _sync(args) -> int:
    import json

    from reconciler.sync import sync

    feedback = _feedback(args)
    result = sync(args.root, _sync_options(args), progress=feedback.stage, detail=feedback.detail,
                  advance=feedback.advance, report=_progress(args))
    _feedback(args).pause()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"{result.outcome}: {result.message}")
        for reason in result.reasons:
            print(f"  {reason}")
        for note in result.notes:
            print(f"  note: {note}")
    return EXIT_OK if result.ok else EXIT_ERROR


def _repository(args) -> str:
    """The repository URL: --repo, or the one line of --repo-file (read once, and kept in
    `args.repo` for what else needs it). The file must be a regular file that only its owner
    (root or this user) may change, since it decides what this device runs; one whose URL
    carries a password or token must be readable by its owner alone, as ssh asks of a key."""
    import stat

    from reconciler.errors import UsageError
    from reconciler.gitsync import carries_credentials, check_url

    if args.repo is not None or not getattr(args, "repo_file", None):
        return args.repo
    path = args.repo_file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang
    except OSError as exc:
        raise UsageError(f"--repo-file: cannot read {path}: {exc.strerror}") from None
    with open(fd, "rb") as file:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise UsageError(f"--repo-file: {path} is not a regular file")
        if status.st_uid not in (0, os.geteuid()) or status.st_mode & 0o022:
            raise UsageError(f"--repo-file: {path} may be changed by another user (owner uid "
                             f"{status.st_uid}, mode {status.st_mode & 0o777:o}), and it decides "
                             f"what this device runs: chown root {path}; chmod go-w {path}")
        data = file.read(65537)
    if len(data) > 65536:
        raise UsageError(f"--repo-file: {path} is larger than 64 KiB; it holds one URL")
    try:
        text = data.decode().removeprefix("\ufeff")  # as some editors save it
    except UnicodeDecodeError:
        raise UsageError(f"--repo-file: {path} is not UTF-8 text") from None
    found = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise UsageError(f"--repo-file: {path} holds no URL (only empty lines and # comments)")
    if len(found) > 1:
        raise UsageError(f"--repo-file: {path}:{found[1][0]}: a second URL; the file holds one")
    number, url = found[0]
    check_url(url)  # its own error, the password redacted
    if carries_credentials(url) and status.st_mode & 0o077:
        raise UsageError(f"--repo-file: {path}:{number}: the URL carries a password or token, "
                         f"and others may read the file (mode {status.st_mode & 0o777:o}): "
                         f"chmod 600 {path}")
    args.repo = url
    return url


MIN_SYNC_INTERVAL = 1.0
"""The shortest --interval of `spos daemon` (and what `spos install` writes): shorter, a fleet's
devices would fetch from the git server without pause."""
MIN_DRIFT_INTERVAL = 0.1
"""The shortest --drift-interval: drift repair reads only this device, but not in a loop."""


def _at_least(option: str, text: str, least: float) -> float:
    from reconciler.errors import UsageError

    value = _duration(option, text)
    if value < least:
        shown = f"{least:g}s" if least >= 1 else f"{least * 1000:g}ms"
        raise UsageError(f"{option}: give at least {shown}, got {text!r}")
    return value


def _daemon(args) -> int:
    from reconciler.agentd import Daemon, DaemonSettings

    children = tuple(name for name, off in (("executor", args.no_executor),
                                            ("triggers", args.no_triggers)) if not off)
    child_args = {"executor": ["--cgroup-root", args.cgroup_root]} if args.cgroup_root else {}
    settings = DaemonSettings(
        interval=_at_least("--interval", args.interval, MIN_SYNC_INTERVAL),
        jitter=_duration("--jitter", args.jitter),
        drift_interval=_at_least("--drift-interval", args.drift_interval, MIN_DRIFT_INTERVAL),
        stop_timeout=_duration("--stop-timeout", args.stop_timeout),
        children=children, child_args=child_args,
    )
    daemon = Daemon(args.root, _sync_options(args), settings)
    print(f"spos daemon: serving {daemon.root} (pid {os.getpid()})", file=sys.stderr)
    daemon.run()
    return EXIT_OK


def _install(args) -> int:
    from reconciler import install
    from reconciler.device import Device
    from reconciler.pipeline import spos_command
    from reconciler.systemctl import detect

    from reconciler.errors import UsageError
    from reconciler.gitsync import check_branch, check_url, redacted

    if args.remove:
        device = Device(args.root)
        return _carry_out_install(args, device, install.plan_install(device, [], None, None, remove=True),
                                  detect(args.root), use_cron=args.cron)
    if not _repository(args):
        raise UsageError("--repo: give the manifests repository, or --repo-file (only --remove "
                         "goes without)")
    _at_least("--interval", args.interval, MIN_SYNC_INTERVAL)
    _duration("--jitter", args.jitter)
    if args.verify_signatures and not os.path.isabs(args.verify_signatures):
        raise UsageError(f"--verify-signatures: the service runs from another directory; give the "
                         f"keyring's absolute path, not {args.verify_signatures!r}")
    if args.cgroup_root and not os.path.isabs(args.cgroup_root):
        raise UsageError(f"--cgroup-root: give an absolute path, not {args.cgroup_root!r}")
    check_url(args.repo)
    check_branch(args.branch)
    device = Device(args.root)
    systemctl = detect(args.root)
    use_cron = args.cron or (not args.systemd and systemctl is None)
    command = (os.environ.get("SPOS_COMMAND") and spos_command()) or _installed_spos()
    argv = install.daemon_argv(command, str(device.root) if args.root != "/" else "/",
                               _sync_options(args), args.interval, args.jitter)
    root = str(device.root) if args.root != "/" else "/"
    planned = install.plan_install(
        device, argv,
        cron_text=install.crontab(argv, command, root, _sync_options(args)) if use_cron else None,
        unit_text=None if use_cron else install.unit(argv),
        remove=False, repo_text=_repository_text(args, device),
    )
    return _carry_out_install(args, device, planned, systemctl, use_cron)


def _carry_out_install(args, device, planned, systemctl, use_cron: bool) -> int:
    from reconciler import install
    from reconciler.gitsync import redacted

    for path, text in planned.write.items():
        print(f"{'Would write' if args.dry_run else 'Writing'} {path}:")
        shown = text.replace(args.repo, redacted(args.repo))  # the file holds it; the screen not
        sys.stdout.write("".join(f"    {line}\n" for line in shown.splitlines()))
    for path in planned.delete:
        print(f"{'Would remove' if args.dry_run else 'Removing'} {path}")
    if not planned.write and not planned.delete:
        print("Nothing to remove: spos's files are not installed." if args.remove
              else "Nothing to do: installed as asked.")
    if args.dry_run:
        return EXIT_OK
    active = systemctl if args.root in ("/", "") else None
    if active is not None and install.UNIT_PATH in planned.delete:
        active.run("disable", "--now", "spos.service")
    crontab = device.read_text(install.CRON_PATH)
    install.carry_out(device, planned)
    if crontab is not None and install.CRON_PATH in planned.delete:
        from reconciler.agentd import LOCK_FILE

        stopped = install.stop_cron_daemon(device, crontab, LOCK_FILE)
        if stopped:
            print(stopped)
    elif crontab is not None and install.CRON_PATH in planned.write:
        from reconciler.agentd import LOCK_FILE

        restarted = install.restart_cron_daemon(device, crontab, planned.write[install.CRON_PATH],
                                                LOCK_FILE)
        if restarted:
            print(restarted)
    if active is not None and (planned.write or planned.delete):
        active.run("daemon-reload")
        if install.UNIT_PATH in planned.write:
            active.run("enable", "spos.service")
            active.run("restart", "spos.service")
            print("Enabled and (re)started spos.service.")
    elif planned.write and not use_cron:
        print("Not activated: systemd is not running this root; it starts the service at boot.")
    return EXIT_OK


def _repository_text(args, device) -> str | None:
    """What install keeps at REPO_PATH: the file as it is when --repo-file names it (spos's
    from an earlier install, or the operator's own, which the unit then names), else the URL
    when it carries a password or token."""
    from reconciler import install

    try:
        named = args.repo_file is not None and os.path.samefile(
            args.repo_file, device.host(install.REPO_PATH))
    except OSError:
        named = False
    if not named:
        return install.repository_file(_sync_options(args))
    current = device.read_text(install.REPO_PATH) or ""
    return current if current.startswith(install.MARKER) else None  # left, never taken over


def _installed_spos() -> tuple[str, ...]:
    """The `spos` console script beside this interpreter, else this interpreter running spos."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "spos")
    if os.access(beside, os.X_OK):
        return (beside,)
    found = shutil.which("spos")
    return (found,) if found else (sys.executable, "-m", "reconciler")


def _metrics(args) -> int:
    from reconciler import metrics
    from reconciler.device import Device
    from reconciler.errors import UsageError

    device = Device(args.root)
    if args.listen:
        address, _, port = args.listen.rpartition(":")
        if not address or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise UsageError(f"--listen: expected ADDRESS:PORT such as 127.0.0.1:9108, got {args.listen!r}")
        metrics.serve(device, address.strip("[]"), int(port), listening_now=lambda: print(
            f"spos metrics: serving http://{args.listen}/metrics (pid {os.getpid()})",
            file=sys.stderr, flush=True))
        return EXIT_OK
    if args.textfile:
        metrics.write_textfile(device, args.textfile, interval=_duration("--interval", args.interval),
                               once=args.once)
        return EXIT_OK
    sys.stdout.write(metrics.exposition(device))
    return EXIT_OK


def _schedule_next(args) -> int:
    from reconciler import forecast
    from reconciler.validate import load

    if args.count < 1:
        from reconciler.errors import UsageError

        raise UsageError("-n: give at least 1")
    manifests = load(args.path, None)  # what the Schedules say; policies change no fire time
    return _show(args, forecast.next_fires(manifests, agent=args.agent, count=args.count),
                 forecast.text)


def _status(args) -> int:
    from reconciler import status
    from reconciler.device import Device

    return _show(args, status.collect(Device(args.root)), status.text)


def _show(args, data, text) -> int:
    """Print `data` as JSON with --json, else as `text(data)` says it; exit 0."""
    if args.json:
        import json

        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(text(data))
    return EXIT_OK


def _executor_args(parser: "argparse.ArgumentParser") -> None:
    _cgroup_root_arg(parser)
    parser.add_argument("--grace", default="10s", metavar="DURATION",
                        help="after SIGTERM, wait this long before killing the run's cgroup (default 10s)")


def _manifest_args(parser: "argparse.ArgumentParser", what: str = "manifests directory") -> None:
    parser.add_argument("path", nargs="?", default="agents.d", metavar="DIR", help=f"{what} (default agents.d)")
    parser.add_argument(
        "--policies", metavar="DIR",
        help="policy directory (default: policies/ beside DIR, when it exists)",
    )


def _policy_dir(args) -> str | None:
    from reconciler.pipeline import PlanRequest

    return PlanRequest(path=args.path, policies=args.policies).policy_dir


def _validate(args) -> int:
    import json

    from reconciler.validate import load

    feedback = _feedback(args)
    manifests = load(args.path, _policy_dir(args), stage=feedback.detail, advance=feedback.advance)
    feedback.pause()
    if args.json:
        print(json.dumps({"valid": True, "manifests": len(manifests), "diagnostics": [],
                          "notes": manifests.notes}, indent=2))
    else:
        for note in manifests.notes:  # what could not be checked here
            print(f"Note: {note}", file=sys.stderr)
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
    _feedback(args).stage(text)


def _feedback(args) -> "_Feedback":
    if not hasattr(args, "feedback"):
        args.feedback = _Feedback(quiet=getattr(args, "json", False))
    return args.feedback


class _Feedback:
    """What a long command (plan, apply, sync) tells the person running it: each stage as it
    starts, and each change as it is applied.

    Plain lines (stages on stderr, changes on stdout) unless both stdout and stderr are a
    terminal: then a live status line at the bottom shows the stage, the elapsed time and, while
    applying, how many of the changes are done; the change lines scroll above it. With --json
    nothing but the JSON is printed."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = not quiet and sys.stdout.isatty() and sys.stderr.isatty()
        self.bar = None
        self.task = None

    def stage(self, text: str, total: int | None = None) -> None:
        if self.quiet:
            return
        if not self.live:
            print(text, file=sys.stderr)
            return
        self.detail(text, total)

    def detail(self, text: str, total: int | None = None) -> None:
        """A step within a stage (checking the manifest files, `total` of them): shown on the
        status line only, never as a line of its own."""
        if not self.live:
            return
        if self.bar is None:
            self._start()
        if self.task is not None:
            self.bar.remove_task(self.task)  # a task's total cannot go back to unknown
        self.task = self.bar.add_task(text.rstrip("."), total=total)

    def advance(self) -> None:
        """One more of the current stage's items is done."""
        if self.task is not None:
            self.bar.advance(self.task)

    def change(self, change, error) -> None:
        from reconciler.views import apply_line

        if self.quiet:
            return
        print(apply_line(change.to_json(), error))  # above the status line, when there is one
        self.advance()

    def pause(self) -> None:
        """Take the status line down (before output that must stand alone, or a question)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = self.task = None

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn)

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.task = None
        self.bar.start()


def _make_plan(args):
    from reconciler.pipeline import make_plan

    return make_plan(_plan_request(args))


def _plan_request(args):
    from reconciler.pipeline import PlanRequest

    return PlanRequest(
        path=args.path, root=args.root, policies=args.policies, cgroup_root=args.cgroup_root,
        device_labels=getattr(args, "device_labels", None), allow_empty=args.allow_empty,
        creating_state=getattr(args, "auto_approve", False),  # apply is about to create the state dir
        stage=lambda text: _stage(args, text),
        detail=_feedback(args).detail, advance=_feedback(args).advance,
    )


def _plan(args) -> int:
    import json

    from reconciler.views import plan_text

    _, result = _make_plan(args)
    _feedback(args).pause()
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
    from reconciler.device import Device
    from reconciler.state import ApplyLock
    from reconciler.views import plan_text

    lock_timeout = _duration("--lock-timeout", args.lock_timeout)
    if os.path.isfile(args.path):
        from reconciler.systemctl import detect

        device = Device(args.root, cgroup_root=_plan_request(args).device_cgroup_root,
                        systemd=detect(args.root))
        planned = _saved_plan(args.path)
        if planned.root != str(device.root):
            from reconciler.errors import UsageError

            raise UsageError(f"{args.path} was planned for root {planned.root}, not {device.root}")
        if not args.json:
            for notice in planned.notices:  # as its plan said: e.g. units written, not activated
                print(f"Note: {notice}")
        from reconciler.apply import apply

        _feedback(args).stage("Applying...", total=len(planned.changes))
        result = apply(device, planned, lock_timeout=lock_timeout, progress=_progress(args))
        return _report_apply(args, planned, result)
    device = Device(args.root)
    device.ensure_root()
    with ApplyLock(device, timeout=lock_timeout):  # nothing changes between plan and apply
        device, planned = _make_plan(args)
        _feedback(args).pause()
        if not args.json:
            sys.stdout.write(plan_text(planned.to_json()))
        if not planned.has_changes:
            return EXIT_OK
        if not args.auto_approve and not _confirm():
            print("Apply cancelled; nothing was changed.", file=sys.stderr)
            return EXIT_ERROR
        from reconciler.apply import apply_locked

        _feedback(args).stage("Applying...", total=len(planned.changes))
        result = apply_locked(device, planned, progress=_progress(args))
    return _report_apply(args, planned, result)


def _saved_plan(path: str):
    import json

    from reconciler.errors import UsageError
    from reconciler.resource import Plan

    try:
        with open(path) as handle:
            return Plan.from_json(json.load(handle))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{path}: not a saved spos plan ({exc})") from None


def _progress(args):
    return _feedback(args).change


def _report_apply(args, planned, result) -> int:
    import json

    _feedback(args).pause()
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
    return run_action(
        args.root, args.agent, args.task, priority=args.priority, schedule=args.schedule,
        deadline=args.deadline, cron=args.cron, cron_tz=args.cron_tz, quiet=args.quiet,
        wait=args.wait, wait_timeout=args.wait_timeout, concurrency=args.concurrency,
    )


def run_action(root: str, agent: str, task: str, *, priority: int | None = None,
               schedule: str | None = None, deadline: str | None = None, cron: str | None = None,
               cron_tz: str | None = None, quiet: bool = False, wait: bool = False,
               wait_timeout: str | None = None, concurrency: str | None = None) -> int:
    """`spos action run`: enqueue one run and print its id. Shared by the full command line and
    the lean entry point crontab lines use (reconciler/_cron.py), which hands `--wait` to the
    full command line."""
    from reconciler.device import Device
    from reconciler.errors import UsageError
    from reconciler.executor.enqueue import enqueue

    if (cron is None) != (cron_tz is None):
        raise UsageError("--cron and --cron-tz go together")
    if wait_timeout is not None and not wait:
        raise UsageError("--wait-timeout goes with --wait")
    if cron is not None and not _cron_matches_now(cron, cron_tz):
        return EXIT_OK
    seconds = _duration("--deadline", deadline) if deadline else None
    patience = _duration("--wait-timeout", wait_timeout) if wait_timeout else None
    source = {"kind": "schedule", "name": schedule} if schedule else {"kind": "manual"}
    device = Device(root)
    record = enqueue(device, agent, task, priority=priority, source=source, deadline_seconds=seconds,
                     concurrency=concurrency)
    if not quiet:
        print(record["id"], flush=True)
    if not wait:
        return EXIT_OK
    return _wait_for_end(device, agent, record["id"], patience)


def _wait_for_end(device, agent: str, run_id: str, patience: float | None) -> int:
    """`action run --wait`: until the run is in completed/ or failed/, where only its final
    state takes it (a run waiting to be retried sits in the queue), then exit as `action
    execute` does. Woken by inotify when a record lands in those directories, with a look every
    few seconds besides; Ctrl-C stops the waiting, not the run."""
    try:
        run = _wait_until_final(device, agent, run_id, patience)
    except KeyboardInterrupt as stopped:
        print(f"spos: stopped waiting; run {run_id} was not cancelled and goes on "
              f"(spos action cancel {run_id} stops it)", file=sys.stderr)
        return 143 if isinstance(stopped, Terminated) else EXIT_INTERRUPTED
    if run.bucket not in ("completed", "failed"):
        print(f"spos: gave up waiting after {patience:g}s; run {run_id} is {run.state} and goes on",
              file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    record = {**run.record, "state": run.state}
    if run.state != "completed":
        print(f"spos: run {run_id} {run.state}: {record.get('reason')}", file=sys.stderr)
    return _exit_code(record)


def _wait_until_final(device, agent: str, run_id: str, patience: float | None):
    """The run once it is final, or as it is when `patience` seconds have passed."""
    import time

    from reconciler import AGENTS_DIR
    from reconciler.errors import SposError
    from reconciler.executor.runs import RunStore

    store = RunStore(device)
    if not _executor_listening(device):
        print(f"spos: no executor is running here; run {run_id} waits in the queue until one starts",
              file=sys.stderr)
    give_up = None if patience is None else time.monotonic() + patience

    def look():  # a finished run's record reaches its final bucket before it leaves active/
        return store.find(run_id, agent, ("completed", "failed")) or store.find(run_id, agent)

    # Watch first, then look: a run that ends in between is still seen.
    with _DirectoryWatch([device.host(f"{AGENTS_DIR}/{agent}/{bucket}")
                          for bucket in ("completed", "failed")]) as watch:
        run = look()
        while run is None or run.bucket not in ("completed", "failed"):
            if run is None:
                raise SposError(f"run {run_id} is gone: it was removed while spos waited for it")
            left = None if give_up is None else give_up - time.monotonic()
            if left is not None and left <= 0:
                return run
            names = watch.wait(left)
            if names is None or any(name == "" or name.endswith(f"-{run_id}.json") for name in names):
                run = look()
    return run


def _exit_code(record: dict) -> int:
    """The exit code of `action execute` and `action run --wait` for a run that ended: the
    action's own; 128+N when signal N ended it (a timeout or a cancel: 143 for SIGTERM, 137 for
    SIGKILL); 1 when it has none (skipped, expired, could not start). Never 0 unless the run
    completed."""
    code = record.get("exitCode")
    result = (128 - code if code < 0 else code) if isinstance(code, int) else EXIT_ERROR
    if record.get("state") != "completed" and result == EXIT_OK:
        return EXIT_ERROR
    return result


def _executor_listening(device) -> bool:
    from reconciler.executor.enqueue import listening

    return listening(device)


class _DirectoryWatch:
    """inotify on a few directories: `wait` returns the names of files created in or renamed
    into them. Without inotify (or a directory to watch), `wait` sleeps a little longer each
    time, up to a second, and returns None: look again."""

    LOOK_ANYWAY = 5.0                # seconds: a lost event costs at most this

    def __init__(self, directories: list[str]):
        from reconciler.inotify import (IN_CREATE, IN_DONT_FOLLOW, IN_MOVED_TO, IN_ONLYDIR, Inotify,
                                        WatchFailed)

        self.inotify = None
        self.pause = 0.05
        try:
            inotify = Inotify()
        except (OSError, WatchFailed):
            return
        events = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW
        try:
            for directory in directories:
                if inotify.add_watch(directory, events) is None:
                    raise WatchFailed(f"{directory} does not exist")
        except WatchFailed:
            inotify.close()
            return
        self.inotify = inotify

    def wait(self, timeout: float | None) -> list[str] | None:
        import time

        if self.inotify is None:
            time.sleep(self.pause if timeout is None else max(0.0, min(self.pause, timeout)))
            self.pause = min(self.pause * 2, 1.0)
            return None
        limit = self.LOOK_ANYWAY if timeout is None else min(timeout, self.LOOK_ANYWAY)
        if not self.inotify.readable(max(0.0, limit)):
            return None  # nothing for a while (or the caller's time is up): look again
        return [event.name for event in self.inotify.read()]

    def __enter__(self) -> "_DirectoryWatch":
        return self

    def __exit__(self, *_) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None


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


def _duration(option: str, text: str) -> float:
    from reconciler.errors import UsageError
    from reconciler.units import seconds

    try:
        value = float(seconds(text))
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    except OverflowError:
        value = float("inf")
    if value > MAX_DURATION:
        raise UsageError(f"{option}: {text!r} is longer than spos waits (at most 10 years)")
    return value


def _make_executor(args, **settings):
    from reconciler.device import Device
    from reconciler.errors import SposError
    from reconciler.executor.dispatch import Executor, Settings
    from reconciler.executor.sandbox import Sandbox

    device = Device(args.root)
    sandbox = Sandbox(root=str(device.root), cgroup_root=args.cgroup_root)
    ready, why = sandbox.available()
    if not ready:
        raise SposError(f"cannot run actions here: {why}")
    return Executor(device, sandbox, Settings(grace=_duration("--grace", args.grace), **settings))


MIN_RESCAN = 0.1


def _executor(args) -> int:
    from reconciler.errors import UsageError

    for option, least in (("max_parallel", 1), ("max_per_agent", 1), ("prepared", 0)):
        if getattr(args, option) < least:
            raise UsageError(f"--{option.replace('_', '-')}: give at least {least}")
    rescan = _at_least("--rescan", args.rescan, MIN_RESCAN)  # shorter: it would list without pause
    executor = _make_executor(
        args,
        max_parallel=args.max_parallel,
        max_per_agent=args.max_per_agent,
        prepared=args.prepared,
        rescan=rescan,
        cleanup_interval=_duration("--cleanup-interval", args.cleanup_interval),
    )
    print(f"spos executor: serving {executor.device.root} (pid {os.getpid()})", file=sys.stderr)
    print(f"spos executor: sandbox: {executor.sandbox.available()[1]}", file=sys.stderr)
    executor.serve(once=args.once)
    return EXIT_OK


def _action_execute(args) -> int:
    from reconciler.executor.enqueue import enqueue

    timeout = _duration("--timeout", args.timeout) if args.timeout else None
    executor = _make_executor(args)
    record = enqueue(executor.device, args.agent, args.task, source={"kind": "execute"}, claim=True,
                     concurrency=args.concurrency)
    print(f"run {record['id']}", file=sys.stderr)
    final = executor.execute(record["id"], args.agent, timeout=timeout)
    state = final.get("state")
    if state != "completed":
        print(f"spos: run {record['id']} {state}: {final.get('reason')}", file=sys.stderr)
    if executor.unrecorded:
        print(f"spos: warning: the state file system refused to record the end of run {record['id']}; "
              "it stays active until an executor starts and runs it again", file=sys.stderr)
    return _exit_code(final)


def _known_agent(store, agent: str | None):
    """`store`, once `agent` (when given) is one the device has a directory for (applied, or
    removed with its history kept): a mistyped name is said, not answered with "No runs." as if
    it had none."""
    from reconciler.errors import UsageError

    if agent is not None:
        agents = sorted(store.agents())
        if agent not in agents:
            known = ", ".join(agents[:10]) + (f" and {len(agents) - 10} more" if len(agents) > 10 else "")
            raise UsageError(f"no agent {agent!r} on this device (its agents: {known or 'none'})")
    return store


def _store(args):
    from reconciler.device import Device
    from reconciler.executor.runs import RunStore

    return RunStore(Device(args.root))


def _find(args):
    from reconciler.errors import UsageError
    from reconciler.executor.report import missing

    store = _store(args)
    run = store.find(args.run_id)
    if run is None:
        raise UsageError(missing(store, args.run_id))
    return run


def _action_list(args) -> int:
    from reconciler.executor import report

    store = _known_agent(_store(args), args.agent)
    runs = [run for run in store.runs(args.agent) if not args.state or run.state == args.state]
    return _print_rows(args, [report.summary(run) for run in runs])


def _action_history(args) -> int:
    from reconciler.executor import report

    if args.limit < 1:
        from reconciler.errors import UsageError

        raise UsageError(f"--limit: give at least 1, not {args.limit}")
    runs = _known_agent(_store(args), args.agent).runs(args.agent, buckets=("completed", "failed"))
    rows = sorted((report.summary(run) for run in runs), key=lambda r: report.sort_time(r.get("endedAt")),
                  reverse=True)
    return _print_rows(args, rows[: args.limit])


def _print_rows(args, rows: list[dict]) -> int:
    import json

    from reconciler.executor import report
    from reconciler.numbers import strict_json

    if args.json:
        print(json.dumps(strict_json(rows), indent=2))
    else:
        sys.stdout.write(report.table(rows))
    return EXIT_OK


def _action_show(args) -> int:
    import json

    from reconciler.executor import report

    run = _find(args)
    finished = list(_store(args).runs(run.agent, buckets=("completed", "failed")))
    history = report.task_history(run, finished)
    if args.json:
        print(json.dumps(report.shown(run, history), indent=2))
    else:
        sys.stdout.write(report.detail(run, history))
    return EXIT_OK


def _action_logs(args) -> int:
    import time

    from reconciler.executor.runs import RUN_ID
    from reconciler.executor.supervise import run_dirs

    store = _store(args)
    run = store.find(args.run_id)
    aside = None
    if run is None and RUN_ID.fullmatch(args.run_id):
        aside = store.found_aside(args.run_id) or store.unreadable(args.run_id)
    if aside is not None:  # its record is unreadable; its log says what happened
        path = store.device.path(run_dirs(aside[0], args.run_id)["log"])
    else:
        run = _find(args)
        path = store.device.path(run_dirs(run.agent, run.id)["log"])
    handle = None
    try:
        while True:
            if handle is None:
                handle = _open_log(path)
            chunk = handle.read() if handle is not None else b""
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            if not args.follow:
                return EXIT_OK
            if handle is not None and not chunk and _rotated(path, handle):
                handle.close()  # read to its end; go on with the new log from its start
                handle = None
                continue
            current = store.find(args.run_id)
            if current is None or current.bucket in ("completed", "failed"):
                if not chunk:
                    return EXIT_OK
                continue
            time.sleep(0.2)
    finally:
        if handle is not None:
            handle.close()


def _open_log(path):
    """The run's log to read, or None while there is none. Only a regular file: a FIFO put in
    its place must not leave the command waiting for a writer."""
    from reconciler.errors import UsageError
    from reconciler.monitor import open_regular

    handle = open_regular(path)
    if handle is None and os.path.lexists(path):
        raise UsageError(f"{path} is not a regular file: it is no run's log")
    return handle


def _rotated(path, handle) -> bool:
    """Whether the log at `path` is no longer the file `handle` reads (it was rotated)."""
    try:
        return os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _action_cleanup(args) -> int:
    import json

    from reconciler.device import Device
    from reconciler.executor import retention

    report = retention.clean(Device(args.root), agent=args.agent, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        sys.stdout.write(retention.text(report))
        for error in report.errors:
            print(f"spos: cleanup: {error}", file=sys.stderr)
    return EXIT_ERROR if report.errors else EXIT_OK


def _action_resources(args) -> int:
    from reconciler import resources

    return _show(args, resources.collect(_measured_device(args)), resources.text)


def _measured_device(args):
    """The device, with the agents' cgroups where --cgroup-root says (default under --root)."""
    from reconciler.device import Device

    cgroup_root = args.cgroup_root or os.path.join(os.path.abspath(args.root), "sys/fs/cgroup")
    return Device(args.root, cgroup_root=cgroup_root)


def _action_monitor(args) -> int:
    from reconciler import monitor

    device = _measured_device(args)
    if args.live:
        if args.json:
            from reconciler.errors import UsageError

            raise UsageError("--live draws on the terminal; --json prints one snapshot: choose one")
        return monitor.live(device, agent=args.agent, interval=_duration("--interval", args.interval))
    return _show(args, monitor.snapshot(device, agent=args.agent), monitor.text)


def _action_watch(args) -> int:
    from reconciler import monitor
    from reconciler.device import Device

    return monitor.watch(Device(args.root), args.agent, as_json=args.json)


def _schedule_suggest(args) -> int:
    from reconciler import suggest
    from reconciler.device import Device

    return _show(args, suggest.propose(Device(args.root), args.path, agent=args.agent), suggest.text)


def _why(args) -> int:
    from reconciler import why
    from reconciler.device import Device

    return _show(args, why.explain(Device(args.root), args.run_id), why.text)


def _triggers(args) -> int:
    from reconciler.device import Device
    from reconciler.errors import UsageError
    from reconciler.triggers.daemon import HEARTBEAT_RANGE, TriggerDaemon

    address, _, port = args.listen.rpartition(":")
    if not address or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen: expected ADDRESS:PORT such as 127.0.0.1:9180, got {args.listen!r}")
    heartbeat = _duration("--heartbeat", args.heartbeat)
    if not HEARTBEAT_RANGE[0] <= heartbeat <= HEARTBEAT_RANGE[1]:
        raise UsageError(f"--heartbeat: from 1s to 1h, got {args.heartbeat!r}")
    daemon = TriggerDaemon(Device(args.root), listen=(address.strip("[]"), int(port)),
                           reload_interval=_duration("--reload-interval", args.reload_interval),
                           heartbeat=heartbeat)
    print(f"spos triggers: serving {daemon.device.root} (pid {os.getpid()})", file=sys.stderr)
    daemon.run()
    return EXIT_OK


def _trigger_list(args) -> int:
    from reconciler.device import Device
    from reconciler.triggers import report

    return _show(args, report.listing(Device(args.root)), report.text)


def _trigger_test(args) -> int:
    import json

    from reconciler.device import Device
    from reconciler.errors import UsageError
    from reconciler.triggers import report

    payload = None
    if args.payload:
        try:
            payload = report.read_payload(args.payload)
        except OSError as exc:
            raise UsageError(f"--payload: cannot read {args.payload}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"--payload: {args.payload}: {exc}") from None
    result = report.fire(Device(args.root), args.name, payload, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        sys.stdout.write(report.fire_text(result))
    return EXIT_OK if result["status"] in ("queued", "would queue", "would skip") else EXIT_ERROR


def _action_cancel(args) -> int:
    from reconciler.executor.cancel import cancel

    outcome = cancel(_store(args), args.run_id)
    print(outcome)
    return EXIT_OK
