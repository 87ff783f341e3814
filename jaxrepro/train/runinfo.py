"""What run.json records about the platform: everything the bits may depend on."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import subprocess
import time

import jax

from jaxrepro import __version__, machine, parallel, rng
from jaxrepro.plumbing import hashing, procenv

log = logging.getLogger("jaxrepro")

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
        "cpu_threads": machine.cpu_threads(),
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


def start_record(previous: dict, setup, state, start: int, how: str) -> dict:
    """run.json at the start of a session: what the run is and what its bits depend on.

    ``previous``: run.json as the interrupted session left it (resume), else {}. The
    platform is checked for portable mode, and a resume on another platform fingerprint
    is recorded (and warned about): the rows after it are not those of an uninterrupted
    run.
    """
    config, origin = setup.config, setup.origin
    info = dict(previous)
    platform = platform_info(portable=config.determinism.portable)
    machine.check_portable(
        platform["portable"], platform["backend"], platform["cpu"], platform["xla_flags"]
    )
    if origin is not None:
        info.setdefault(
            "replay",
            dict(
                origin.info,
                from_step=origin.step,
                until=setup.end,
                skip_batches=origin.skip_batches,
            ),
        )
    elif how == "init":  # the state just built: no second init (and compile) to hash
        info["init_param_hash"] = hashing.tree_hash(state.params)
    info.update(
        status="running",
        seeds=setup.seeds,
        platform=platform,
        libraries=library_versions(),
        code=code_version(),
        conv_impl=setup.conv_impl,
        phases={
            p.name: {
                "start": p.start,
                "steps": p.steps,
                "batch_size": p.batch_size,
                "num_classes": p.num_classes,
            }
            for p in setup.phases
        },
        total_steps=setup.total,
    )
    info.setdefault("resumes", [])
    if how == "resume":
        info["resumes"].append(_resume_record(previous.get("platform"), platform, start))
    info["mesh"] = setup.par.describe()
    info["determinism"] = parallel.determinism_record(config.determinism)
    return info


def end_hashes(state) -> dict:
    """run.json's hashes of a finished (done or diverged) run's final state."""
    return {
        "final_param_hash": hashing.tree_hash(state.params),
        "final_state_hash": hashing.tree_hash((state.params, state.batch_stats, state.opt_state)),
    }


def _resume_record(before: dict | None, platform: dict, start: int) -> dict:
    resume = {"from_step": start, "time": time.time()}
    diffs = (
        machine.differences(machine.fingerprint(before), platform["fingerprint"])
        if before
        else ["the interrupted run recorded no platform"]
    )
    if diffs:  # the run goes on, but is no longer a function of one platform
        resume["platform_differences"] = diffs
        log.warning(
            "resumed on another platform, so the rows from step %d on are not bitwise "
            "those of an uninterrupted run: %s",
            start,
            "; ".join(diffs),
        )
    return resume
