"""Agents' cgroups: one per Agent, `spos/<agent>` under `--cgroup-root`.

The cgroup holds the agent's Quota for all of its runs together (the executor puts each run
in its own cgroup below it, `spos/<agent>/<run>`, which the kernel keeps within it): memory,
CPU, tasks and, where the kernel can set one, an I/O weight (cgroupfs.py has the files for
both layouts). An agent without a Quota gets a cgroup without limits, so its runs are grouped
and counted all the same. spos owns everything below `spos/` and nothing else; a device root
other than `/` owns `spos-<hash of the root>/` instead (cgroupfs.parent_for).

A limit changed by hand is drift: plan shows it, apply writes it back. A cgroup that still has
processes (a run going on) is not deleted: the plan says so, apply leaves it and reports it as
failed, and a later apply removes it once the runs ended.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Collection, Iterable

from reconciler import cgroupfs
from reconciler.kinds.agent import compile_quota
from reconciler.manifest import Manifest, ManifestSet
from reconciler.resource import Change, Facts, Resource

if TYPE_CHECKING:
    from reconciler.device import Device
    from reconciler.memo import PlanMemo



class CgroupKind:
    name = "cgroup"
    replace_on: tuple[str, ...] = ()

    def inputs(self, manifests: ManifestSet) -> dict[str, tuple[Manifest, ...]]:
        """Resource id -> every manifest its rendering reads (render.py relies on this). Pure."""
        quotas = manifests.of_kind("Quota")
        return {
            f"cgroup/{agent.name}": tuple(
                m for m in (agent, quotas.get(agent.refs.quota)) if m is not None)
            for agent in manifests.of_kind("Agent").values()
        }

    def render(self, manifests: ManifestSet, facts: Facts,
               skip: Collection[str] = ()) -> Iterable[Resource]:
        """One cgroup per Agent, when the device has cgroups. Pure."""
        if facts.cgroup_version is None:
            return
        parent = facts.cgroup_parent
        quotas = manifests.of_kind("Quota")
        for agent in manifests.of_kind("Agent").values():
            if f"cgroup/{agent.name}" in skip:
                continue
            quota = quotas.get(agent.spec.get("quota"))
            compiled = compile_quota(quota.name, quota.spec) if quota is not None else {}
            yield Resource(
                id=f"cgroup/{agent.name}",
                kind=self.name,
                attrs={
                    "cgroup": f"{parent}/{agent.name}",
                    **cgroupfs.limits(compiled, facts.cgroup_weight_file),
                },
                source=agent.where,
            )

    def observe(self, device: "Device", ids: set[str], discover: bool = True,
                memo: "PlanMemo | None" = None) -> dict[str, Resource]:
        """Every agent cgroup below this device's spos parent, with its limits read back, and
        how many processes it holds (a note, not an attribute)."""
        tree = device.cgroups
        if tree.version is None:
            return {}
        parent = tree.parent
        names = {rid.split("/", 1)[1] for rid in ids}
        if discover:
            names.update(tree.children(parent))
        files = cgroupfs.limit_files(tree.version, tree.weight_file())
        found = {}
        for name in sorted(names):
            path = f"{parent}/{name}"
            values = {file: tree.read(path, file) for file in files}
            if all(value is None for value in values.values()):
                continue
            limits = cgroupfs.read_back(tree.version, values)
            processes = tree.processes(path)
            found[f"cgroup/{name}"] = Resource(
                f"cgroup/{name}", self.name,
                attrs={"cgroup": path, **limits},
                note=f"{processes} live process{'es' if processes != 1 else ''} in it" if processes else "",
            )
        return found

    def apply(self, device: "Device", changes: list[Change]) -> Iterable[tuple[Change, str | None]]:
        tree = device.cgroups
        for change in changes:
            try:
                if change.action == "delete":
                    self._delete(tree, change.before["cgroup"])
                else:
                    self._write(tree, change.after)
            except OSError as exc:
                yield change, self._why(change, exc)
            else:
                yield change, None

    @staticmethod
    def _write(tree, attrs: dict) -> None:
        path = attrs["cgroup"]
        files = (cgroupfs.v1_files(attrs, tree.weight_file()) if tree.version == 1
                 else cgroupfs.v2_files(attrs))
        tree.create(path, {"memory", "cpu", "pids", *(["io"] if attrs.get("ioWeight") else [])})
        for file, value in files.items():
            if tree.read(path, file) != value:
                tree.write(path, file, value)

    @staticmethod
    def _delete(tree, path: str) -> None:
        if tree.processes(path):
            raise OSError(errno.EBUSY, "it still has processes")
        tree.remove(path)
        if not tree.children(tree.parent):
            tree.remove_parent_if_empty()

    @staticmethod
    def _why(change: Change, exc: OSError) -> str:
        if exc.errno == errno.EBUSY and change.action == "delete":
            return (f"{change.before['cgroup']} still has processes (a run going on); it is kept "
                    "and removed by a later apply once they have ended")
        return f"{change.id}: {exc.strerror or exc}"


KIND = CgroupKind()
