"""Beyond one device: the data-parallel mesh, per-host data, multi-host start, GPU determinism.

One program runs on 1 CPU, 8 GPUs or a multi-host slice. The batch is sharded along the
mesh axis ``'data'`` (``NamedSharding(mesh, P('data'))``) and the train state is replicated
(``P()``); the step is jitted with those shardings, so GSPMD inserts the all-reduces:
gradients and BatchNorm statistics are global-batch ones and the model needs no change.

Multi-host: every process computes the same global order (it is a pure function of the data
seed), reads only its own contiguous block of each global batch (``host_slice``) and hands it
to ``jax.make_array_from_process_local_data``. So the global batch is the same whatever the
host count. Only process 0 writes the workdir's files (``is_primary``); every process takes
part in orbax saves.

Deterministic GPU mode: XLA reads ``XLA_FLAGS`` when the backend starts, so
``apply_determinism`` must run before any JAX computation (the CLI calls it first thing).
The max-pool needs nothing here: ``model.maxpool_impl='deterministic'`` (the default) has a
scatter-free gradient, which the deterministic-ops flag requires.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrepro.errors import ConfigError, JaxreproError

log = logging.getLogger("jaxrepro")

AXIS = "data"
# Env of an explicit multi-host launch (launch/README.md); SLURM and Cloud TPU are detected.
ENV_COORDINATOR = "JAXREPRO_COORDINATOR"
ENV_NUM_PROCESSES = "JAXREPRO_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXREPRO_PROCESS_ID"
ENV_DISTRIBUTED = "JAXREPRO_DISTRIBUTED"  # 'off' | 'auto' | unset (detect)
DETERMINISTIC_OPS_FLAG = "--xla_gpu_deterministic_ops"
AUTOTUNE_FLAG = "--xla_gpu_autotune_level"


class LaunchError(JaxreproError, ValueError):
    """A multi-host launch is misconfigured (environment, device layout)."""


# ----------------------------------------------------------------------------- host slices


def host_bounds(global_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch of ``global_size`` that one host reads.

    Hosts take equal contiguous blocks in process order, matching a mesh whose devices are
    ordered by process (``DataParallel``), so each host's block lands on its own devices.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} is not in [0, {process_count}) "
            f"(process_count {process_count})"
        )
    if global_size % process_count:
        raise ValueError(
            f"global batch of {global_size} examples does not split over "
            f"{process_count} hosts; make it a multiple of the host count"
        )
    share = global_size // process_count
    return process_index * share, (process_index + 1) * share


def host_slice(
    global_ids, process_index: int, process_count: int, local_device_count: int = 1
) -> np.ndarray:
    """The example ids of a global batch that host ``process_index`` reads. Pure.

    Args:
      global_ids: the ids of the whole global batch, in batch order.
      process_index: this host (0-based).
      process_count: number of hosts.
      local_device_count: devices per host; each host's share must split over them too.

    Returns:
      The host's contiguous block of ``global_ids``; the blocks of hosts 0..P-1 concatenated
      are ``global_ids`` again.
    """
    ids = np.asarray(global_ids)
    if ids.ndim != 1:
        raise ValueError(f"global_ids must be 1-D, got shape {ids.shape}")
    if local_device_count < 1:
        raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")
    devices = process_count * local_device_count
    if len(ids) % max(devices, 1):
        raise ValueError(
            f"global batch of {len(ids)} examples does not split over {process_count} hosts "
            f"x {local_device_count} devices"
        )
    start, stop = host_bounds(len(ids), process_index, process_count)
    return ids[start:stop]


# ----------------------------------------------------------------------------- the mesh


def _process_major(devices) -> list:
    return sorted(devices, key=lambda d: (d.process_index, d.id))


class DataParallel:
    """A 1-D ``'data'`` mesh: batch sharded, state replicated.

    Args:
      num_devices: use the first this many devices (process-major order); None: all.
    """

    def __init__(self, num_devices: int | None = None):
        devices = _process_major(jax.devices())
        if num_devices is not None:
            if not 1 <= num_devices <= len(devices):
                raise ConfigError(
                    f"config field parallel.num_devices: {num_devices} is not in "
                    f"[1, {len(devices)}] (the devices there are)"
                )
            if jax.process_count() > 1 and num_devices != len(devices):
                raise ConfigError(
                    "config field parallel.num_devices: a multi-host run uses every device; "
                    f"leave it unset (got {num_devices} of {len(devices)})"
                )
            devices = devices[:num_devices]
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.batch = NamedSharding(self.mesh, P(AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.num_devices = len(devices)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        self.local_devices = sum(d.process_index == self.process_index for d in devices)
        self._check_layout()

    def _check_layout(self) -> None:
        """Each host's devices must hold exactly the rows ``host_bounds`` gives it."""
        size = self.num_devices
        rows = sorted(
            idx[0].start or 0
            for idx in self.batch.addressable_devices_indices_map((size,)).values()
        )
        want = host_bounds(size, self.process_index, self.process_count)
        if rows != list(range(*want)):
            raise LaunchError(
                f"process {self.process_index}: the mesh gives this host batch rows {rows}, "
                f"not the contiguous block {want}; every host needs the same device count"
            )

    def describe(self) -> dict:
        """What run.json records about the mesh."""
        return {
            "axis": AXIS,
            "devices": self.num_devices,
            "device_ids": [int(d.id) for d in self.mesh.devices.flat],
            "process_count": self.process_count,
            "local_devices": self.local_devices,
        }

    # -- sizes
    def check_batch_size(self, batch_size: int, field: str) -> None:
        if batch_size % self.num_devices:
            raise ConfigError(
                f"config field {field}: {batch_size} is not divisible by the "
                f"{self.num_devices} devices of the mesh"
            )

    def round_up(self, size: int) -> int:
        """``size`` rounded up to a multiple of the device count (eval batches are padded)."""
        return -(-size // self.num_devices) * self.num_devices

    def host_slice(self, global_ids) -> np.ndarray:
        return host_slice(global_ids, self.process_index, self.process_count, self.local_devices)

    # -- placing data
    def shard_batch(self, local: Mapping | tuple, global_rows: int):
        """Host-local rows (this host's block) -> global arrays sharded along ``'data'``."""
        local = jax.tree.map(np.asarray, local)
        if self.process_count == 1 and all(
            x.shape[:1] == (global_rows,) for x in jax.tree.leaves(local)
        ):
            return jax.device_put(local, self.batch)  # one call for the whole batch

        def put(x):
            return jax.make_array_from_process_local_data(
                self.batch, x, (global_rows, *x.shape[1:])
            )

        return jax.tree.map(put, local)

    def replicate(self, tree):
        """Every leaf replicated on the mesh (the same value on every process)."""

        def put(x):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated)
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                # A typed key cannot be device_put across processes: rebuild it from its words.
                impl = jax.random.key_impl(x)
                data = np.asarray(jax.device_get(jax.random.key_data(x)))
                wrap = jax.jit(
                    lambda d: jax.random.wrap_key_data(d, impl=impl),
                    out_shardings=self.replicated,
                )
                return wrap(data)
            if self.process_count > 1:
                x = np.asarray(jax.device_get(x))
            return jax.device_put(x, self.replicated)

        return jax.tree.map(put, tree)

    # -- compiling
    def jit_train_step(self, step_fn):
        """``step_fn(state, batch, aug_root, dropout_root, controls)`` with the mesh's shardings.

        The state is donated, and comes back replicated, so step after step it keeps the
        sharding the compiled program expects.
        """
        rep, bat = self.replicated, self.batch
        return jax.jit(
            step_fn,
            in_shardings=(rep, bat, rep, rep, rep),
            out_shardings=(rep, rep),
            donate_argnums=(0,),
        )

    def jit_eval_step(self, eval_fn):
        """``eval_fn(params, batch_stats, images, labels, mask)`` with the mesh's shardings."""
        rep, bat = self.replicated, self.batch
        return jax.jit(eval_fn, in_shardings=(rep, rep, bat, bat, bat), out_shardings=rep)


# ----------------------------------------------------------------------------- multi-host


def is_primary() -> bool:
    """Process 0 writes the workdir's files; the others compute the same and write nothing."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_int(value: int) -> int:
    """Process 0's ``value`` on every process."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (e.g. one host got SIGTERM)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


STOP_CHECK_EVERY = 10  # multi-host: steps between SIGTERM agreements (each a collective)


def agreed_stop(requested: bool, step: int) -> bool:
    """Whether to stop for SIGTERM at ``step``: on every host alike.

    Multi-host, the hosts compare their flags every ``STOP_CHECK_EVERY`` steps only (a
    collective), so they all stop, and save, at the same step.
    """
    if jax.process_count() == 1:
        return requested
    return step % STOP_CHECK_EVERY == 0 and any_process(requested)


class RowMirror:
    """A non-primary host's metrics: the rows in memory (for the detector), no file."""

    def __init__(self, rows: list[dict]):
        self.rows = list(rows)

    def write(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


def _env_int(env: Mapping, name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise LaunchError(f"{ENV_COORDINATOR} is set, so {name} must be set too")
    try:
        return int(raw)
    except ValueError as e:
        raise LaunchError(f"{name}={raw!r} is not an integer") from e


def _multi_task_slurm(env: Mapping) -> bool:
    # srun sets SLURM_STEP_NUM_TASKS; the batch script itself (or an array task) has 1 task.
    try:
        return int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    except ValueError:
        return False


def _multi_worker_tpu(env: Mapping) -> bool:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def distributed_settings(env: Mapping | None = None) -> dict | None:
    """The arguments for ``jax.distributed.initialize`` from the environment, or None. Pure.

    ``JAXREPRO_COORDINATOR=host:port`` with ``JAXREPRO_NUM_PROCESSES`` and
    ``JAXREPRO_PROCESS_ID``: an explicit launch. Otherwise a multi-task SLURM step or a
    multi-worker Cloud TPU VM is left to JAX's own detection (``{}``).
    ``JAXREPRO_DISTRIBUTED=off`` disables it, ``=auto`` forces detection.
    """
    env = os.environ if env is None else env
    mode = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode not in ("", "auto", "on", "1", "true", "yes"):
        raise LaunchError(f"{ENV_DISTRIBUTED}={mode!r}: expected 'off' or 'auto'")
    address = env.get(ENV_COORDINATOR)
    if address:
        n = _env_int(env, ENV_NUM_PROCESSES)
        pid = _env_int(env, ENV_PROCESS_ID)
        if n < 1 or not 0 <= pid < n:
            raise LaunchError(f"{ENV_PROCESS_ID}={pid} is not in [0, {ENV_NUM_PROCESSES}={n})")
        return {"coordinator_address": address, "num_processes": n, "process_id": pid}
    if mode or _multi_task_slurm(env) or _multi_worker_tpu(env):
        return {}
    return None


def initialize(settings: dict | None = None, *, env: Mapping | None = None) -> dict | None:
    """Starts ``jax.distributed`` when ``settings`` (or the environment) asks for it.

    Must run before any JAX computation. Returns the settings used, or None for a
    single-process run. Calling it again once initialised does nothing.
    """
    if settings is None:
        settings = distributed_settings(env)
    if settings is None:
        return None
    if jax.distributed.is_initialized():
        return dict(settings)
    jax.distributed.initialize(**settings)
    log.info(
        "jax.distributed: process %d of %d, %d local devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )
    return dict(settings)


# ----------------------------------------------------------------------------- GPU determinism


def determinism_flags(settings: Mapping | None) -> list[str]:
    """The XLA flags deterministic GPU mode adds (``settings``: the config's ``determinism``).

    None means the defaults: deterministic ops on, autotuning off (autotuning times kernels
    and may pick another algorithm on another run).
    """
    settings = dict(settings or {"gpu_deterministic": True, "gpu_autotune_level": 0})
    if not settings.get("gpu_deterministic", True):
        return []
    flags = [f"{DETERMINISTIC_OPS_FLAG}=true"]
    level = settings.get("gpu_autotune_level", 0)
    if level is not None:
        flags.append(f"{AUTOTUNE_FLAG}={int(level)}")
    return flags


def gpu_possible(env: Mapping | None = None) -> bool:
    """Whether JAX may pick a GPU, decided without starting a backend."""
    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", env.get("JAX_PLATFORM_NAME", "")).lower()
    if platforms:
        return any(p in platforms for p in ("cuda", "gpu", "rocm"))
    names = {(d.metadata.get("Name") or "").lower() for d in importlib.metadata.distributions()}
    return any(n.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")) for n in names)


def _flag_names(xla_flags: str) -> set[str]:
    return {f.split("=", 1)[0] for f in xla_flags.split()}


def apply_determinism(settings: Mapping | None, env: dict | None = None) -> list[str]:
    """Adds the deterministic-mode flags to ``XLA_FLAGS`` before the backend starts.

    Only where a GPU may be used (CPU runs keep their flags, and so their setup fingerprint);
    a flag the user already set in ``XLA_FLAGS`` wins. Returns the flags added.
    """
    env = os.environ if env is None else env
    if not gpu_possible(env):
        return []
    from jax._src import xla_bridge  # no public way to ask whether a backend has started

    current = env.get("XLA_FLAGS", "")
    present = _flag_names(current)
    added = [f for f in determinism_flags(settings) if f.split("=", 1)[0] not in present]
    if not added:
        return []
    if env is os.environ and xla_bridge.backends_are_initialized():
        log.warning(
            "deterministic GPU mode asked for %s, but the backend has started; set them in "
            "XLA_FLAGS before the first JAX computation (the CLI does)",
            added,
        )
        return []
    env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def determinism_record(settings: Mapping | None) -> dict:
    """For run.json: what was asked, the XLA flags in force, and whether the mode is on."""
    wanted = determinism_flags(settings)
    xla_flags = os.environ.get("XLA_FLAGS", "")
    in_force = set(xla_flags.split())
    backend = jax.default_backend()
    on_gpu = backend in ("gpu", "cuda", "rocm")
    active = on_gpu and bool(wanted) and all(f in in_force for f in wanted)
    if on_gpu and wanted and not active:
        log.warning("deterministic GPU mode is not in force: XLA_FLAGS=%r", xla_flags)
    return {
        "requested": dict(settings or {}),
        "flags": wanted,
        "xla_flags": xla_flags,
        "backend": backend,
        "active": active,
    }
