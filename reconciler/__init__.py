"""spos: converge a Linux device to the agents, schedules and limits declared in git."""

__version__ = "0.1.0"

STATE_DIR = "var/lib/systemprompt-os"
"""Where spos keeps its own state, relative to the device root."""

AGENTS_DIR = f"/{STATE_DIR}/agents"
"""One directory per agent: its compiled config and its runs. Shared by the reconciler, which
writes the config, and the executor, which reads it (docs/agent-config.md, docs/queue.md)."""

TRIGGERS_DIR = f"/{STATE_DIR}/triggers"
"""One registration file per Trigger, written by the reconciler and read by the trigger daemon
(docs/triggers.md)."""

AGENT_CONFIG = "agent.json"
"""The compiled agent config's file name inside the agent's directory."""
