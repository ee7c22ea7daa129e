"""The trigger daemon: events on the device become queued actions.

The reconciler writes one registration per Trigger manifest to
`/var/lib/systemprompt-os/triggers/<name>.json` (kinds/trigger.py; the format is in
docs/triggers.md). The daemon (`spos triggers`) reads only those registrations and writes only
to the action queue, through the executor's `enqueue`: it never reads manifests and never
imports the planner.

- `base`: what every source shares: the registration, the event it emits, the source protocol.
- one module per event source: `filesystem`, `webhook`, `serial`, `condition`, `mqtt`,
  `continuous`. A source watches for its events and hands each to `emit`; it knows nothing of
  the queue.
- `gate`: the policy every trigger shares (enabled, debounce, rate limit, concurrency) between
  a source's events and the queue.
- `daemon`: loads registrations, starts and stops sources, reloads on change, writes status.
"""
