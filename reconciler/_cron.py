"""The lean entry point crontab lines run: `python3 -I -S .../reconciler/_cron.py ARGS`.

Cron starts `spos action run` every minute on many devices, so its start-up cost matters. This
script runs with `-I -S` (no site-packages processing, no user paths: enqueueing needs only the
standard library), reads only the options spos itself renders into crontab lines, and hands
anything else to the full command line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reconciler import cli  # noqa: E402  (the path above makes the package importable)

_VALUED = {"--root", "--agent", "--task", "--schedule", "--deadline", "--cron", "--cron-tz", "--priority",
           "--concurrency"}


def _parse(argv: list[str]) -> dict | None:
    """The options of `[--root R] action run ...` as rendered by spos, or None for anything else."""
    options: dict = {"quiet": False}
    words = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in _VALUED and index + 1 < len(argv):
            options[word[2:].replace("-", "_")] = argv[index + 1]
            index += 2
        elif word in ("-q", "--quiet"):
            options["quiet"] = True
            index += 1
        elif word.startswith("-"):
            return None
        else:
            words.append(word)
            index += 1
    if words != ["action", "run"] or "agent" not in options or "task" not in options:
        return None
    if "priority" in options:
        if not options["priority"].isdigit():
            return None
        options["priority"] = int(options["priority"])
    return options


def main(argv: list[str]) -> int:
    options = _parse(argv)
    if options is None:
        return cli.main(argv)
    root = options.pop("root", "/")
    agent, task = options.pop("agent"), options.pop("task")
    return cli.guarded(lambda: cli.run_action(root, agent, task, **options))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
