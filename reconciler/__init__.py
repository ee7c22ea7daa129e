"""spos: converge a Linux device to the agents, schedules and limits declared in git."""

__version__ = "0.1.0"

STATE_DIR = "var/lib/systemprompt-os"
"""Where spos keeps its own state, relative to the device root."""
