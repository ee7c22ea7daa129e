"""Building and finding the compiled sandbox launcher (`launch.c`).

setup.py compiles it when spos is installed (into the package, or into the checkout for an
editable install); the sandbox uses it when it is there and otherwise runs `_launch.py` with
the system's Python, which does the same and takes about 15 ms longer per run. The binary is
named after a digest of the source, so a build left over from another version is never run.

Standard library only: setup.py loads this file by path, before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("launch.c")
PREFIX = "spos-launch-"


def binary_name(source: Path = SOURCE) -> str:
    """The file name of the build of this exact source."""
    return PREFIX + hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def compiled_launcher(directory: Path | None = None) -> str | None:
    """The path of the launcher built from the current source, or None if there is none."""
    try:
        path = (directory or SOURCE.parent) / binary_name()
    except OSError:  # the source is not installed: nothing could match it
        return None
    return str(path) if os.access(path, os.X_OK) and path.is_file() else None


def build(into: Path, *, compiler: str | None = None, source: Path = SOURCE) -> tuple[Path | None, str]:
    """Compile `source` into `into`/<binary_name>, statically linked where the C library allows
    it; remove older builds there. Returns (the path, "") or (None, why not).

    Without `compiler` or $CC, musl's `musl-gcc` comes first where it is installed: a static
    program on glibc asks the CPU about its caches at every start (cpuid, which in a virtual
    machine traps to the hypervisor: ~0.6 ms per start here, against 0.05 ms on musl), and a
    run starts the launcher twice. Then cc or gcc, static, else dynamic."""
    if compiler or os.environ.get("CC"):
        candidates = [(compiler or os.environ["CC"], (["-static"], []))]
    else:
        candidates = [(path, links) for path, links in (
            (shutil.which("musl-gcc"), (["-static"],)),
            (shutil.which("cc") or shutil.which("gcc"), (["-static"], [])),
        ) if path]
    if not candidates:
        return None, "no C compiler (cc, gcc or $CC)"
    target = into / binary_name(source)
    partial = into / f".{target.name}.{os.getpid()}"
    errors = []
    for compiler, links in candidates:
        for link in links:  # static: nothing to load inside the sandbox, fastest start
            done = subprocess.run([compiler, "-O2", "-Wall", *link, "-o", str(partial), str(source)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                os.chmod(partial, 0o755)
                os.replace(partial, target)
                for old in into.glob(PREFIX + "*"):
                    if old.name != target.name:
                        old.unlink(missing_ok=True)
                return target, ""
            errors.append(f"{compiler} failed: {done.stderr.strip()}")
    partial.unlink(missing_ok=True)
    return None, "; ".join(errors)


def main() -> int:
    """`python3 -m reconciler.executor._build`: build the launcher beside its source unless the
    current one is there (what setup.py does; for a checkout whose build was skipped or lost)."""
    found = compiled_launcher()
    if found:
        print(f"compiled launcher: {found}")
        return 0
    built, why_not = build(SOURCE.parent)
    print(f"compiled launcher: {built}" if built else f"launcher not compiled: {why_not}")
    return 0 if built else 1


if __name__ == "__main__":
    raise SystemExit(main())
