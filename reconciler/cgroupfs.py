"""What a Quota means in cgroup files, for both layouts. Pure: no I/O.

Shared by the cgroup resource kind (an agent's cgroup, made by apply) and the executor (a run's
cgroup below it). A limit is given as the value the kernel reads back, so that what apply
writes and what observe reads compare equal:

| limit | cgroup v1 | cgroup v2 | unlimited |
|---|---|---|---|
| memory | `memory/…/memory.limit_in_bytes` | `memory.max` | v1 `-1` (reads back as a huge number), v2 `max` |
| cpu | `cpu/…/cpu.cfs_quota_us` + `cpu.cfs_period_us` | `cpu.max` ("quota period") | `-1` / `max` |
| tasks | `pids/…/pids.max` | `pids.max` | `max` |
| io weight | `blkio/…/blkio.weight` (CFQ, 10-1000) or `blkio.bfq.weight` (BFQ, 1-1000) | `io.weight` ("default N", 1-10000) | not managed |
"""

from __future__ import annotations

CPU_PERIOD_US = 100_000
PAGE_SIZE = 4096
UNLIMITED = "max"
V1_UNLIMITED_FROM = 1 << 62
"""v1 reads an unlimited memory limit back as LONG_MAX rounded down to a page."""

DEFAULT_IO_WEIGHT = 100
"""systemd's default IOWeight: what an agent without a weight gets, so none is left as found."""


def parent_for(root: str) -> str:
    """The cgroup spos owns for the device at `root`: `spos` for a real device (`/`), and one of
    its own for each other root (a demo or test root), so that devices sharing one cgroup
    file system never prune or limit each other's agents."""
    if root.rstrip("/") == "":
        return "spos"
    import hashlib  # not at import: the device layer, which cron's every-minute enqueue loads, imports this

    return f"spos-{hashlib.sha256(root.rstrip('/').encode()).hexdigest()[:12]}"


def cpu_quota_us(percent: float) -> int:
    """CPU time per period for a percentage of one CPU (200% = two CPUs); at least 1 ms."""
    return max(1000, round(percent * CPU_PERIOD_US / 100))


def memory_limit(memory_bytes: int | None) -> str:
    """The limit as the kernel keeps it: rounded down to whole pages."""
    if memory_bytes is None:
        return UNLIMITED
    return str(max(PAGE_SIZE, memory_bytes // PAGE_SIZE * PAGE_SIZE))


def io_weight(weight: int, weight_file: str) -> str:
    """The value for `weight_file` of a Quota's ioWeight (systemd's IOWeight scale, 1-10000):
    CFQ's blkio.weight is scaled the way systemd converts IOWeight to BlockIOWeight."""
    if weight_file == "blkio.weight":
        return str(max(10, min(1000, weight * 5)))
    if weight_file == "blkio.bfq.weight":
        return str(max(1, min(1000, weight)))
    return f"default {max(1, min(10000, weight))}"


def limits(quota: dict, weight_file: str | None) -> dict[str, str | None]:
    """The limits of a compiled quota (kinds/agent.compile_quota; {} for none), version-neutral:
    {"memory", "cpu" ("quota period"), "tasks", "ioWeight"}; ioWeight None when there is no
    weight file here, the default weight when the Quota sets none."""
    cpu = quota.get("cpuPercent")
    tasks = quota.get("tasksMax")
    weight = quota.get("ioWeight") or DEFAULT_IO_WEIGHT
    return {
        "memory": memory_limit(quota.get("memoryBytes")),
        "cpu": UNLIMITED if cpu is None else f"{cpu_quota_us(cpu)} {CPU_PERIOD_US}",
        "tasks": UNLIMITED if tasks is None else str(tasks),
        "ioWeight": io_weight(weight, weight_file) if weight_file else None,
    }


def v1_files(values: dict[str, str | None], weight_file: str | None) -> dict[str, str]:
    """Controller-relative file -> value to write, for cgroup v1."""
    quota, _, period = values["cpu"].partition(" ")
    files = {
        "memory/memory.limit_in_bytes": "-1" if values["memory"] == UNLIMITED else values["memory"],
        "cpu/cpu.cfs_period_us": period or str(CPU_PERIOD_US),
        "cpu/cpu.cfs_quota_us": "-1" if quota == UNLIMITED else quota,
        "pids/pids.max": values["tasks"],
    }
    if values.get("ioWeight") is not None and weight_file:
        files[f"blkio/{weight_file}"] = values["ioWeight"]
    return files


def v2_files(values: dict[str, str | None]) -> dict[str, str]:
    """File -> value to write, for cgroup v2."""
    files = {"memory.max": values["memory"], "cpu.max": values["cpu"], "pids.max": values["tasks"]}
    if values.get("ioWeight") is not None:
        files["io.weight"] = values["ioWeight"]
    return files


def limit_files(version: int, weight_file: str | None) -> list[str]:
    """The files that hold the limits on this layout (what `v1_files`/`v2_files` write)."""
    files = (["memory/memory.limit_in_bytes", "cpu/cpu.cfs_period_us", "cpu/cpu.cfs_quota_us",
              "pids/pids.max"] if version == 1 else ["memory.max", "cpu.max", "pids.max"])
    if weight_file:
        files.append(f"blkio/{weight_file}" if version == 1 else weight_file)
    return files


def read_back(version: int, files: dict[str, str | None]) -> dict[str, str | None]:
    """The version-neutral limits from what the files hold (None: file missing)."""
    if version == 1:
        memory = files.get("memory/memory.limit_in_bytes")
        if memory is not None and memory.lstrip("-").isdigit() and (
                int(memory) < 0 or int(memory) >= V1_UNLIMITED_FROM):
            memory = UNLIMITED
        quota, period = files.get("cpu/cpu.cfs_quota_us"), files.get("cpu/cpu.cfs_period_us")
        cpu = None if quota is None else (UNLIMITED if quota == "-1" else f"{quota} {period}")
        weight = next((v for k, v in files.items() if k.startswith("blkio/")), None)
        return {"memory": memory, "cpu": cpu, "tasks": files.get("pids/pids.max"), "ioWeight": weight}
    weight = files.get("io.weight")
    if weight is not None:
        weight = next((line for line in weight.splitlines() if line.startswith("default")), weight)
    cpu = files.get("cpu.max")
    if cpu is not None and cpu.startswith(UNLIMITED):
        cpu = UNLIMITED
    return {"memory": files.get("memory.max"), "cpu": cpu, "tasks": files.get("pids.max"),
            "ioWeight": weight}
