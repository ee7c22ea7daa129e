"""Resource kinds: one module each, rendering the desired form, reading the actual form, and
making the smallest change from one to the other.

Adding a kind means adding its module here and to `ALL`: plan, apply, views and the CLI treat
every kind alike. Order matters: creates and updates run in this order, deletes in reverse (an
agent, and its cgroup, exist before a trigger, timer or crontab line that runs it, and outlive
them).
A kind may also have `finish(device, applied)`, run once after every kind applied (systemd
reloads once per apply).
"""

from reconciler.kinds import agent, cgroup, cron, systemd, trigger

ALL = (agent.KIND, cgroup.KIND, trigger.KIND, systemd.KIND, cron.KIND)
BY_NAME = {kind.name: kind for kind in ALL}
