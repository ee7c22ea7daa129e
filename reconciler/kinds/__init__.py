"""Resource kinds: one module each, rendering the desired form, reading the actual form, and
making the smallest change from one to the other.

Adding a kind means adding its module here and to `ALL`: plan, apply, views and the CLI treat
every kind alike. Order matters: creates and updates run in this order, deletes in reverse (an
agent exists before a crontab line that enqueues to it, and outlives it).
"""

from reconciler.kinds import agent, cgroup, cron

ALL = (agent.KIND, cgroup.KIND, cron.KIND)
BY_NAME = {kind.name: kind for kind in ALL}
