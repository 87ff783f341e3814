"""Settings that must be in the environment when the process starts: huge pages for malloc.

XLA:CPU allocates a step's buffers anew at every step, and glibc serves large allocations
with fresh ``mmap``s, so every step touches its pages for the first time: a ResNet-50
train step at 224x224, batch 8, took ~315 k page faults and ~0.55 s of kernel time per
step (2 cores), at 32x32 ~53 k. glibc's tunable ``glibc.malloc.hugetlb=1`` makes malloc
ask for transparent huge pages (``madvise``), and the faults fall to ~1 k a step: the
224x224 step ran ~1.3x faster, the 32x32 one ~1.45x, a whole digits run took 62 s
instead of 69 s (results/bench/NOTES.md). The arithmetic is the same: a digits run's
final state hash is unchanged. (Saves of checkpoints cost more kernel time with it, as
huge pages get compacted while the page cache fills: the net is still the 62 s.)

glibc reads tunables only when a process starts, so the CLI (``run_main``) re-executes
itself once with the tunable added when it is missing, on Linux with glibc and
transparent huge pages not set to ``never``. ``JAXREPRO_HUGEPAGES=0`` turns this off; a
``GLIBC_TUNABLES`` that already names ``glibc.malloc.hugetlb`` is left as it is.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
DISABLE = "JAXREPRO_HUGEPAGES"  # "0": leave malloc as it is
MARK = "JAXREPRO_PROCENV"  # set in the re-executed process: never re-execute twice
THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_PATH) -> str | None:
    """'always' | 'madvise' | 'never', or None where the kernel has no such setting."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def wanted_env(env: dict, *, system: str, libc: str, thp: str | None) -> dict | None:
    """The environment to re-execute under, or None when the current one is right."""
    if system != "Linux" or libc != "glibc" or thp in (None, "never"):
        return None
    if env.get(DISABLE) == "0" or env.get(MARK):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    out = dict(env)
    out["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    out[MARK] = "1"
    return out


def malloc_setting() -> str:
    """What run.json and the benches record: the glibc malloc tunables in effect."""
    return os.environ.get("GLIBC_TUNABLES", "")


def platform_facts() -> dict:
    """This machine's ``system``, ``libc`` and ``thp`` mode, as ``wanted_env`` takes them."""
    return {"system": platform.system(), "libc": platform.libc_ver()[0], "thp": _thp_mode()}


def reexec_if_needed(argv: list[str]) -> None:
    """Replaces this process with ``python -m jaxrepro ARGV[1:]`` under the wanted env.

    Call before anything heavy is imported; returns only when nothing needs changing.
    """
    env = wanted_env(dict(os.environ), **platform_facts())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "jaxrepro", *argv[1:]], env)
