"""What run.json records about the platform: everything the bits may depend on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import jax

from jaxrepro import __version__, machine, procenv, rng

_LIBS = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "numpy",
    "ml-collections",
)


def library_versions() -> dict[str, str]:
    return {lib: _version(lib) for lib in _LIBS}


def code_version() -> dict:
    """jaxrepro's version, and the git commit it runs from when it runs from a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    commit = dirty = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
        if commit:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"jaxrepro": __version__, "git_commit": commit, "git_dirty": dirty}


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def platform_info(portable: bool = False) -> dict:
    """Backend, devices, processes, CPU and its threads, XLA flags, PRNG settings.

    ``fingerprint`` is the part that bitwise equality is conditional on (jaxrepro.machine);
    ``portable``: whether the run is in portable CPU mode (``determinism.portable``).
    """
    devices = jax.devices()
    xla_flags = os.environ.get("XLA_FLAGS", "")
    info = {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "cpu_threads": cpu_threads(),
        "cpu_count": os.cpu_count(),
        "xla_flags": xla_flags,
        "xla_cpu_max_isa": machine.effective_max_isa(xla_flags),
        "cpu": machine.cpu_info(),
        "portable": bool(portable),
        "jaxlib": _version("jaxlib"),
        "glibc_tunables": procenv.malloc_setting(),  # huge pages for malloc (speed only)
        "machine": platform.machine(),
        "python": platform.python_version(),
        **rng.settings(),
    }
    info["fingerprint"] = machine.fingerprint(info)
    info["fingerprint_id"] = machine.fingerprint_id(info["fingerprint"])
    return info


def _version(lib: str) -> str | None:
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return None
