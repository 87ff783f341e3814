"""What run.json records about the platform: everything the bits may depend on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import jax

from jaxrepro import __version__, procenv, rng

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
    out = {}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


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


def platform_info() -> dict:
    """Backend, devices, processes, CPU threads, XLA flags and PRNG settings."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "cpu_threads": cpu_threads(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": procenv.malloc_setting(),  # huge pages for malloc (speed only)
        "machine": platform.machine(),
        "python": platform.python_version(),
        **rng.settings(),
    }


def setup_fingerprint(info: dict) -> dict:
    """The part of the platform that bitwise equality is conditional on (compare like with like)."""
    keys = ("backend", "device_kind", "device_count", "process_count", "cpu_threads", "xla_flags")
    return {k: info.get(k) for k in keys}
