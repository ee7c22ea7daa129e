"""The executor: runs queued actions.

It reads only the compiled agent config (docs/agent-config.md) and the on-disk queue
(docs/queue.md); it never imports the planner or the applier.
"""
