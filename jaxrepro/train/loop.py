"""One training run: pretrain then fine-tune, writing the workdir of docs/design.md.

Decide how to start, in this order: (1) validate the config; (2) claim the workdir (a
different config there is refused, the same one resumes); (3) restore the latest complete
checkpoint if there is one, else initialise from the ``init`` seed; (4) drop the metrics
rows the resumed run will write again. Then, at every global step s:

    phase boundary -> final eval of the old phase, new head + fresh Adam
    eval (if due)  -> eval rows for state s
    save (if due)  -> checkpoint s (async)
    train step s   -> train row s

so a checkpoint at s always follows the rows it implies, and a kill at any moment resumes
to the same bits.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import time

import jax
import numpy as np

from jaxrepro import config as config_lib
from jaxrepro import data as data_lib
from jaxrepro import dropoff as dropoff_lib
from jaxrepro import hashing, jsonio, machine, parallel, rng
from jaxrepro.checkpoints import Checkpoints, protected_steps
from jaxrepro.data import order as order_lib
from jaxrepro.data import pipeline as pipeline_lib
from jaxrepro.errors import CheckpointError, ConfigError, DataError, JaxreproError, WorkdirError
from jaxrepro.sigterm import SigtermFlag
from jaxrepro.train import runinfo
from jaxrepro.train import state as state_lib
from jaxrepro.train.step import (
    make_eval_step,
    make_train_step,
    unpack_metrics,
    with_packed_metrics,
)
from jaxrepro.workdir import MetricsWriter, Workdir

log = logging.getLogger("jaxrepro")

_FAR_MEAN = 0.5  # fine-tune input mean this many pretrain stds away -> warn
_FAR_STD = 2.0  # fine-tune input std off by this factor -> warn
_STOP_CHECK_EVERY = 10  # multi-host: steps between SIGTERM agreements (each a collective)
# The host reads the train steps' metrics in blocks of this many steps, once 2x this many
# are in flight: a host thread that wakes for every step costs the step's own threads
# ~3 ms a step on a 2-core CPU, one that wakes every 8 steps ~1 ms (results/bench/NOTES.md).
# Rows, drop-off events and the non-finite stop do not depend on it (see Runner._flush).
_FETCH_BLOCK = 8


@dataclasses.dataclass
class Data:
    """The four splits a run reads."""

    source_train: object
    source_eval: object
    target_train: object
    target_eval: object

    def train(self, phase: str):
        return self.source_train if phase == "pretrain" else self.target_train


def load_data(config) -> Data:
    d = config.data
    kw = dict(
        data_dir=d.data_dir,
        image_size=d.image_size,
        jpeg_draft=d.jpeg_draft,
        on_corrupt=d.on_corrupt,
        max_in_memory_bytes=int(config.runtime.max_in_memory_mb) << 20,
    )
    return Data(
        source_train=data_lib.load(d.source.name, d.source.train_split, **kw),
        source_eval=data_lib.load(d.source.name, d.source.eval_split, **kw),
        target_train=data_lib.load(d.target.name, d.target.train_split, **kw),
        target_eval=data_lib.load(d.target.name, d.target.eval_split, **kw),
    )


def resolve_conv_impl(config) -> str:
    impl = config.model.conv_impl
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "lax"
    return impl


def phase_steps(config, name: str, num_examples: int) -> int:
    p = config[name]
    if p.steps is not None:
        return int(p.steps)
    epochs = int(p.epochs or 0)
    if epochs == 0:
        return 0
    if p.batch_size > num_examples and config.data.remainder == "drop":
        raise ConfigError(
            f"config field {name}.batch_size: {p.batch_size} is larger than the "
            f"{num_examples} training examples (remainder 'drop' leaves no batch)"
        )
    return order_lib.num_steps(num_examples, p.batch_size, epochs, config.data.remainder)


def make_phases(config, data: Data, conv_impl: str) -> list[state_lib.Phase]:
    phases, start = [], 0
    for name in rng.PHASES:
        src = data.train(name)
        steps = phase_steps(config, name, len(src))
        devices = config.parallel.num_devices or jax.device_count()  # the mesh's size
        if config[name].batch_size % devices:
            raise ConfigError(
                f"config field {name}.batch_size: {config[name].batch_size} is not divisible "
                f"by the {devices} devices"
            )
        phases.append(state_lib.make_phase(config, name, start, steps, src.num_classes, conv_impl))
        start += steps
    return phases


def eval_row(phase, step: int, split: str, loss_sum, correct, n: int) -> dict:
    """The metrics.jsonl row of an eval of ``split`` at ``step``, from sums over its n examples."""
    return {
        "kind": "eval",
        "step": step,
        "phase": phase.name,
        "phase_step": step - phase.start,
        "split": split,
        "loss": float(loss_sum / n),
        "accuracy": float(correct / n),
        "n": n,
    }


def train_row(phase, step: int, epoch, m) -> dict:
    """The metrics.jsonl row of train step ``step`` from the step's fetched metrics."""
    row = {
        "kind": "train",
        "step": step,
        "phase": phase.name,
        "phase_step": step - phase.start,
        "epoch": int(epoch),
    }
    for k in ("loss", "accuracy", "grad_norm", "update_norm", "param_norm", "lr"):
        row[k] = float(m[k])
    row["finite"] = bool(m["finite"])
    if not m["applied"]:
        row["skipped"] = True
    return row


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a branch run (a replay) starts: another run's checkpoint.

    The branch restores ``step`` from ``checkpoint_dir`` (read only), trains to ``until``
    (None: the end), and from ``step`` on reads the batches ``skip_batches`` further along
    the data order. ``info`` is recorded in config.json (so a different origin in the same
    directory is refused) and run.json.
    """

    checkpoint_dir: str
    step: int
    until: int | None = None
    skip_batches: int = 0
    info: dict = dataclasses.field(default_factory=dict)
    history: tuple = ()  # the original's metric rows before ``step`` (detector context)


@contextlib.contextmanager
def frozen_gc():
    """Keeps Python's full garbage collections out of the step loop's way.

    A full (generation 2) collection walks every tracked object: with jax's tracing
    caches and the compiled steps in the process, 165-290 ms each, about one per 160 steps
    of a digits run (results/bench/NOTES.md, "End to end"). ``gc.freeze()`` moves the objects
    alive now out of the collector's reach; the loop calls it again after each compile and
    eval. Objects are still freed by reference counting as ever; only cyclic garbage made
    before a freeze waits for the ``gc.unfreeze()`` at the end, where it is collected.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run(config, workdir: str, *, stop_after: int | None = None, origin: Origin | None = None):
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns run.json's content.

    ``stop_after``: stop once this many global steps are done, as a crash would (no final
    save); used by the audit and by tests of resume. ``origin``: branch from another run's
    checkpoint (see ``jaxrepro.replay``).
    """
    rng.configure()
    config_lib.validate(config)
    parallel.apply_determinism(config.determinism)  # in time only before the backend starts
    machine.apply_portable(config.determinism.portable)  # likewise; refused once too late
    ws = Workdir(workdir)
    claimed = config_lib.to_dict(config)
    if origin is not None:
        claimed["replay"] = dict(
            origin.info, from_step=origin.step, until=origin.until, skip_batches=origin.skip_batches
        )
    resuming = _claim(ws, claimed)
    run_info = ws.read_run()
    if resuming and run_info.get("status") in ("done", "diverged"):
        log.info("%s: run already %s; nothing to do", ws.path, run_info["status"])
        return run_info
    runner = Runner(config, ws, resuming, origin)
    try:
        return runner.run(stop_after)
    except BaseException as e:  # record why, keep what is on disk, and re-raise
        if not isinstance(e, KeyboardInterrupt | JaxreproError) and parallel.is_primary():
            ws.update_run(status="failed", error=f"{type(e).__name__}: {str(e)[:2000]}")
        raise


def _claim(ws: Workdir, claimed: dict) -> bool:
    """Process 0 claims the workdir; the other hosts follow its verdict (and its refusal)."""
    verdict, error = -1, None
    if parallel.is_primary():
        try:
            verdict = int(ws.claim(claimed))
        except WorkdirError as e:
            error = e
    verdict = parallel.broadcast_int(verdict)
    if error is not None:
        raise error
    if verdict < 0:
        raise WorkdirError(f"process 0 refused the workdir {ws.path} (its log says why)")
    return bool(verdict)


class Runner:
    """The state of one run's host loop (kept out of the pure step)."""

    def __init__(
        self,
        config,
        ws: Workdir,
        resuming: bool,
        origin: Origin | None = None,
        *,
        checkpoints: bool = True,
    ):
        """``checkpoints=False``: no checkpoint manager (nothing created in the workdir):
        a runner for its data, phases, keys and initial state only, which cannot ``run``
        (the PyTorch reference trainer, benchmarks)."""
        if resuming and not checkpoints:
            raise ValueError("a runner without checkpoints cannot resume")
        self.config = config
        self.ws = ws
        self.origin = origin
        self.seeds = rng.resolve_seeds(config)
        self.roots = rng.roots(self.seeds)
        self._data_key = order_lib.host_key(self.roots["data"])
        self.conv_impl = resolve_conv_impl(config)
        self.par = parallel.DataParallel(config.parallel.num_devices)
        self.primary = parallel.is_primary()  # only process 0 writes the workdir's files
        self.data = load_data(config)
        self.phases = make_phases(config, self.data, self.conv_impl)
        self.total = self.phases[-1].end
        self.end = self.total
        if origin is not None and origin.until is not None:
            self.end = min(origin.until, self.total)
        self.plan = self._make_plan()
        self.prefetcher = None  # the worker pipeline of the run's lazily read train steps
        self.data_wait = pipeline_lib.WaitStats()  # how long steps waited for their batch
        self.ckpts = Checkpoints(ws.checkpoint_dir) if checkpoints else None
        self.resume_step = self.ckpts.latest_step() if resuming else None
        self.info = ws.read_run() if resuming else {}
        self.input_stats = {}  # phase -> [sum of means, sum of stds, count]
        self.compile_s = {}
        self._train_fns = {}
        self._eval_fns = {}
        self._eval_batches = {}
        self._mesh_keys = {}
        # Device-count-invariant mode evaluates on one device, every host all rows: the same
        # program on any layout, so eval rows are bitwise invariant too (not only train rows).
        self.eval_one_device = bool(config.determinism.device_invariant)

    # -- setup
    def phase_of(self, step: int) -> state_lib.Phase:
        for p in self.phases:
            if step < p.end:
                return p
        return self.phases[-1]

    def _first_phase(self) -> state_lib.Phase:
        return next(p for p in self.phases if p.steps > 0)

    def init_state(self):
        p0 = self.phases[0]
        params, batch_stats = state_lib.init_variables(
            p0.module, self.roots["init"], self.config.data.image_size
        )
        params, batch_stats = state_lib.load_pretrained(self.config, params, batch_stats)
        state = state_lib.initial_state(p0, params, batch_stats)
        if self._first_phase().name == "finetune":
            state = state_lib.to_finetune(self.config, self.seeds, state, self.phases[1])
        return state

    def _restore(self, ckpts: Checkpoints, step: int):
        phase = self.phase_of(step)
        if step == self.total:
            phase = self.phases[-1]
        target = jax.eval_shape(self.init_state)
        if phase.name == "finetune" and self._first_phase().name == "pretrain":
            target = jax.eval_shape(
                lambda s: state_lib.to_finetune(self.config, self.seeds, s, phase), target
            )
        target = self.par.replicate(target)  # restore straight into replicated arrays
        state, meta = ckpts.restore(step, target, expect={"model": self.config.model.name})
        log.info("restored checkpoint %d (%s) from %s", step, meta.get("phase"), ckpts.directory)
        return state, meta["phase"]

    # -- compiled functions
    def train_fn(self, phase, state, batch):
        if phase.name not in self._train_fns:
            static = dict(
                module=phase.module,
                tx=phase.tx,
                lr_fn=phase.lr_fn,
                phase_start=phase.start,
                augment_cfg=self.config.data.augment,
                mean=tuple(self.config.data.normalize.mean),
                std=tuple(self.config.data.normalize.std),
                policy=self.config.train.nonfinite_policy,
            )
            if self.config.determinism.device_invariant:
                from jaxrepro import invariant  # opt-in: grouped, fixed-order reductions

                fn = invariant.make_invariant_train_step(
                    mesh=self.par.mesh,
                    groups=self.config.determinism.groups,
                    packed_metrics=True,
                    **static,
                )
            else:  # batch sharded; metrics as one vector (one fetch a step)
                fn = self.par.jit_train_step(with_packed_metrics(make_train_step(**static)))
            t0 = time.perf_counter()
            compiled = fn.lower(state, batch, *self.mesh_keys(phase)).compile()
            self.compile_s[f"train_{phase.name}"] = round(time.perf_counter() - t0, 3)
            self._train_fns[phase.name] = compiled
        return self._train_fns[phase.name]

    def keys(self, phase):
        return (
            rng.phase_root(self.roots["aug"], phase.name),
            rng.phase_root(self.roots["dropout"], phase.name),
        )

    def mesh_keys(self, phase):
        """``keys(phase)`` replicated on the mesh, as the compiled step takes them."""
        if phase.name not in self._mesh_keys:
            self._mesh_keys[phase.name] = self.par.replicate(self.keys(phase))
        return self._mesh_keys[phase.name]

    def eval_fn(self, phase):
        if phase.name not in self._eval_fns:
            fn = make_eval_step(
                module=phase.module,
                mean=tuple(self.config.data.normalize.mean),
                std=tuple(self.config.data.normalize.std),
            )
            if self.eval_one_device:
                self._eval_fns[phase.name] = jax.jit(fn)
            else:
                self._eval_fns[phase.name] = self.par.jit_eval_step(fn)
        return self._eval_fns[phase.name]

    def _eval_batch_size(self) -> int:
        bs = self.config.train.eval_batch_size
        return bs if self.eval_one_device else self.par.round_up(bs)

    # -- data
    def _make_plan(self) -> pipeline_lib.Plan:
        """Which ids every step reads (the data order, a replay's skip, this host's rows)."""
        origin = self.origin
        segments = tuple(
            pipeline_lib.Segment(
                phase=p.name,
                start=p.start,
                end=p.end,
                batch_size=p.batch_size,
                reader=self.data.train(p.name).reader,
                skip_from=None if origin is None else origin.step,
                skip_batches=0 if origin is None else origin.skip_batches,
            )
            for p in self.phases
            if p.steps > 0
        )
        return pipeline_lib.Plan(
            data_key=self._data_key,
            remainder=self.config.data.remainder,
            segments=segments,
            process_index=self.par.process_index,
            process_count=self.par.process_count,
            local_devices=self.par.local_devices,
        )

    def batch_ids(self, phase, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example ids, their epochs) of the global batch of ``step``."""
        if not phase.start <= step < phase.end:
            raise ValueError(f"step {step} is not in phase {phase.name}")
        return self.plan.global_ids(step)

    def start_pipeline(self, start: int) -> None:
        """Worker processes decode the batches of the lazily read train steps from ``start``
        on, ahead of the step (``runtime.data_workers`` > 0; in-memory splits need none)."""
        workers = int(self.config.runtime.data_workers)
        lazy = [
            np.arange(max(start, p.start), min(self.end, p.end))
            for p in self.phases
            if not self.data.train(p.name).in_memory
        ]
        steps = np.concatenate([np.zeros(0, np.int64), *lazy])
        if workers > 0 and len(steps):
            self.prefetcher = pipeline_lib.Prefetcher(
                self.plan, steps, workers=workers, prefetch=int(self.config.runtime.data_prefetch)
            )
            log.info(
                "%d data worker processes decode the batches of %d steps ahead",
                workers,
                len(steps),
            )

    def stop_pipeline(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def batch(self, phase, step: int) -> dict:
        """The global batch of ``step`` as host arrays (every host's rows)."""
        return self._read(phase, *self.batch_ids(phase, step))

    def device_batch(self, phase, step: int) -> tuple[dict, int]:
        """(the global batch sharded over the mesh, the epoch of its first example).

        This host reads only its own rows of the global batch (``parallel.host_slice``).
        """
        src = self.data.train(phase.name)
        t0 = time.monotonic()
        if self.prefetcher is not None and not src.in_memory:
            batch = self.prefetcher.get(step)
            epoch = int(self.plan.global_ids(step)[1][0])
            self._note_corrupt(src, batch["corrupt"])
            local = {k: batch[k] for k in ("image", "label", "id", "epoch")}
            wait = self.prefetcher.last_wait_s
        else:
            ids, epochs = self.batch_ids(phase, step)
            local = self._read(phase, self.par.host_slice(ids), self.par.host_slice(epochs))
            epoch = int(epochs[0])
            wait = 0.0 if src.in_memory else time.monotonic() - t0  # decoded here, now
        # Had the device finished every step dispatched so far when the batch came?
        pending = getattr(self, "pending", None)
        idle = not pending or pending[-1][3].is_ready()
        self.data_wait.add(wait, time.monotonic() - t0, device_idle=idle)
        return self.par.shard_batch(local, phase.batch_size), epoch

    @staticmethod
    def _note_corrupt(src, ids) -> None:
        """Records the corrupt records a worker skipped (with their error, read here once)."""
        for index in map(int, ids):
            if index not in src.corrupt:
                try:
                    src.reader.example(index)
                    src.corrupt[index] = "decoded here, not in the worker"
                except data_lib.CorruptRecordError as error:
                    src.corrupt[index] = str(error.__cause__)
                log.warning("skipped corrupt record %d of %s %s", index, src.name, src.split)

    def corrupt_report(self) -> list[dict]:
        """Every corrupt record met so far (each once), for run.json."""
        seen = {}
        for src in (
            self.data.source_train,
            self.data.source_eval,
            self.data.target_train,
            self.data.target_eval,
        ):
            for index, error in src.corrupt.items():
                seen[(src.name, src.split, index)] = error
        return [
            {"dataset": name, "split": split, "id": index, "error": error}
            for (name, split, index), error in sorted(seen.items())
        ]

    def _read(self, phase, ids, epochs) -> dict:
        images, labels = self.data.train(phase.name).get(ids)
        return {
            "image": images,
            "label": np.asarray(labels, np.int32),
            "id": np.asarray(ids, np.int32),
            "epoch": np.asarray(epochs, np.int32),
        }

    def eval_sets(self, phase) -> list[tuple[str, object]]:
        """Source test always with the pretrain head; both when the label sets agree."""
        sets = []
        for split, src in (
            ("source_test", self.data.source_eval),
            ("target_test", self.data.target_eval),
        ):
            if src.num_classes == phase.num_classes:
                sets.append((split, src))
        return sets

    def _eval_batches_of(self, split, src):
        """This host's rows of every eval batch (padded to a multiple of the device count)."""
        if split not in self._eval_batches:
            bs = self._eval_batch_size()
            n = len(src)
            batches = []
            for i in range(0, n, bs):
                global_ids = np.arange(i, i + bs)
                ids = np.where(global_ids < n, global_ids, -1)
                if not self.eval_one_device:
                    ids = self.par.host_slice(ids)
                rows = len(ids)
                ids = ids[ids >= 0]  # padding sits at the end of the batch, so of each slice
                images, labels = src.get(ids)
                pad = rows - len(ids)
                mask = np.concatenate([np.ones(len(ids), bool), np.zeros(pad, bool)])
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
                labels = np.concatenate([labels, np.zeros(pad, labels.dtype)]).astype(np.int32)
                batches.append((images, labels, mask))
            self._eval_batches[split] = batches
        return self._eval_batches[split]

    def evaluate(self, phase, state, step: int) -> list[dict]:
        rows = []
        fn = self.eval_fn(phase)
        bs = self._eval_batch_size()
        if self.eval_one_device:
            # This host's copy of the replicated state, on its first device (no transfer).
            params, stats = jax.tree.map(
                lambda a: a.addressable_data(0), (state.params, state.batch_stats)
            )
        for split, src in self.eval_sets(phase):
            if self.eval_one_device:
                sums = [fn(params, stats, *b) for b in self._eval_batches_of(split, src)]
            else:
                sums = [
                    fn(state.params, state.batch_stats, *self.par.shard_batch(b, bs))
                    for b in self._eval_batches_of(split, src)
                ]
            sums = jax.device_get(sums)
            loss_sum = sum(s["loss_sum"] for s in sums)
            correct = sum(s["correct"] for s in sums)
            rows.append(eval_row(phase, step, split, loss_sum, correct, len(src)))
        return rows

    # -- the loop
    def _start(self):
        """(state, its phase name, first step to run, how: 'init' | 'resume' | 'origin')."""
        if self.resume_step is not None:
            state, phase_name = self._restore(self.ckpts, self.resume_step)
            return state, phase_name, self.resume_step, "resume"
        if self.origin is not None:
            src = Checkpoints(self.origin.checkpoint_dir, read_only=True)
            if self.origin.step not in src.steps():
                raise CheckpointError(
                    f"no checkpoint {self.origin.step} in {src.directory} (have {src.steps()})"
                )
            state, phase_name = self._restore(src, self.origin.step)
            src.close()
            return state, phase_name, self.origin.step, "origin"
        state = self.init_state()
        return state, self._first_phase().name, 0, "init"

    def _write_run_start(self, start_step: int, how: str, state):
        info = dict(self.info)
        platform = runinfo.platform_info(portable=self.config.determinism.portable)
        machine.check_portable(
            platform["portable"], platform["backend"], platform["cpu"], platform["xla_flags"]
        )
        if self.origin is not None:
            info.setdefault(
                "replay",
                dict(
                    self.origin.info,
                    from_step=self.origin.step,
                    until=self.end,
                    skip_batches=self.origin.skip_batches,
                ),
            )
        elif how == "init":  # the state just built: no second init (and compile) to hash
            info["init_param_hash"] = hashing.tree_hash(state.params)
        info.update(
            status="running",
            seeds=self.seeds,
            platform=platform,
            libraries=runinfo.library_versions(),
            code=runinfo.code_version(),
            conv_impl=self.conv_impl,
            phases={
                p.name: {
                    "start": p.start,
                    "steps": p.steps,
                    "batch_size": p.batch_size,
                    "num_classes": p.num_classes,
                }
                for p in self.phases
            },
            total_steps=self.total,
        )
        info.setdefault("resumes", [])
        if how == "resume":
            resume = {"from_step": start_step, "time": time.time()}
            before = self.info.get("platform")
            diffs = (
                machine.differences(machine.fingerprint(before), platform["fingerprint"])
                if before
                else ["the interrupted run recorded no platform"]
            )
            if diffs:  # the run goes on, but is no longer a function of one platform
                resume["platform_differences"] = diffs
                log.warning(
                    "%s: resumed on another platform, so the rows from step %d on are not "
                    "bitwise those of an uninterrupted run: %s",
                    self.ws.path,
                    start_step,
                    "; ".join(diffs),
                )
            info["resumes"].append(resume)
        info["mesh"] = self.par.describe()
        info["determinism"] = parallel.determinism_record(self.config.determinism)
        self.info = info
        if self.primary:
            self.ws.update_run(**info)

    def _save(self, step, state, phase_name):
        """Checkpoint ``step`` unless it exists (orbax never overwrites a step)."""
        if step in self.ckpts.steps():
            return
        self._flush()  # rows up to step-1 reach disk before the checkpoint that implies them
        self.ckpts.save(step, state, {"phase": phase_name, "model": self.config.model.name})
        c = self.config.checkpoint
        events = [e["step"] for e in self.detector.events]
        self.ckpts.retain(c.keep_last, c.keep_every, protected_steps(self.ckpts.steps(), events))

    def run(self, stop_after: int | None) -> dict:
        if self.ckpts is None:
            raise RuntimeError("this Runner was made with checkpoints=False and cannot run")
        try:
            return self._run(stop_after)
        except DataError as e:  # a corrupt record, a dead data worker: say so in run.json
            if self.primary:
                self.ws.update_run(status="failed", error=f"{type(e).__name__}: {str(e)[:2000]}")
            raise
        finally:
            self.stop_pipeline()

    def _run(self, stop_after: int | None) -> dict:
        state, state_phase, start, how = self._start()
        self._write_run_start(start, how, state)
        state = self.par.replicate(state)
        metrics = self._open_metrics(None if how == "init" else start, state_phase)
        self.detector = dropoff_lib.OnlineDetector(self.config.dropoff)
        history = metrics.rows
        if how == "origin" and self.origin.history:
            # A branch judges its first steps against the original's recent past, so a
            # drop-off just after the restore step is seen as in the original run.
            history = [*self.origin.history, *metrics.rows]
        for row in history:  # the detector is a pure function of the history
            self.detector.update(row)
        self.metrics = metrics
        self.pending = collections.deque()  # (phase, step, epoch, metrics) not yet read
        # Non-finite steps so far (a resumed state's count, then each step as it is read),
        # and under policy 'stop' the step after the first non-finite one.
        self._nonfinite = int(np.asarray(state.nonfinite))
        self._stop_at = None
        status, t_start, last_print, done_steps = "running", time.perf_counter(), 0.0, 0
        self.start_pipeline(start)
        with SigtermFlag() as sigterm, frozen_gc():  # preemption: checkpoint, exit cleanly
            s, stopping = start, False
            while s < self.end:
                phase = self.phase_of(s)
                save_due = s == phase.start or self._due(self.config.checkpoint.every, s)
                eval_due = self._due(phase.eval_every, s - phase.start)
                if state_phase != phase.name or eval_due or save_due:
                    self._flush()  # rows up to s-1 first; a stop among them ends the run here
                    if self._stop_at is not None:
                        break
                if state_phase != phase.name:  # the pretrain -> fine-tune boundary
                    prev = next(p for p in self.phases if p.name == state_phase)
                    self._log_rows(self.evaluate(prev, state, s))
                    state = state_lib.to_finetune(self.config, self.seeds, state, phase)
                    state = self.par.replicate(state)
                    state_phase = phase.name
                if eval_due:
                    self._log_rows(self.evaluate(phase, state, s))
                    gc.freeze()  # what the eval (and its first compile) left stays put
                if save_due:
                    self._save(s, state, state_phase)
                batch, epoch = self.device_batch(phase, s)
                fn = self.train_fn(phase, state, batch)
                state, m = fn(state, batch, *self.mesh_keys(phase))
                self.pending.append((phase, s, epoch, m))
                s += 1
                done_steps += 1
                if len(self.pending) >= 2 * _FETCH_BLOCK:  # read the oldest block
                    self._flush(_FETCH_BLOCK)  # while the newer steps compute
                if self._stop_at is not None:
                    break
                stopping = self._agreed_stop(sigterm.requested, s)
                if stopping or (stop_after is not None and s >= stop_after):
                    break
                now = time.perf_counter()
                if s == phase.start + 1 or done_steps == 1:
                    gc.freeze()  # after the step's compile
                if done_steps == 1:
                    t_first = now  # steps/s from here on: compile time is reported apart
                elif now - last_print > self.config.runtime.progress_every_s:
                    last_print = now
                    self._progress(phase, s, done_steps - 1, now - t_first)
            self._flush()
            if self._stop_at is not None:
                status, s = "diverged", self._stop_at
            elif s >= self.end:
                phase = next(p for p in self.phases if p.name == state_phase)
                self._log_rows(self.evaluate(phase, state, s))
                self._save(s, state, state_phase)
                status = "done"
            elif stopping:
                self._save(s, state, state_phase)
                log.warning("SIGTERM: saved checkpoint %d; rerun the same command to resume", s)
        self.ckpts.close()
        metrics.close()
        return self._finish(state, status, s, time.perf_counter() - t_start)

    def _agreed_stop(self, requested: bool, step: int) -> bool:
        """Whether to stop for SIGTERM at ``step``: on every host alike.

        Multi-host, the hosts compare their flags every few steps only (a collective), so
        they all stop, and save, at the same step.
        """
        if self.par.process_count == 1:
            return requested
        return step % _STOP_CHECK_EVERY == 0 and parallel.any_process(requested)

    def _open_metrics(self, keep_before_step, restored_phase):
        """Process 0's MetricsWriter; the other hosts keep the same rows in memory only."""
        writer = None
        if self.primary:
            writer = MetricsWriter(self.ws.metrics_path, keep_before_step, restored_phase)
        parallel.sync("metrics-open")
        if writer is None:
            writer = parallel.RowMirror(jsonio.read_jsonl(self.ws.metrics_path))
        parallel.sync("metrics-read")  # before process 0 appends
        return writer

    @staticmethod
    def _due(every: int, phase_step: int) -> bool:
        return phase_step == 0 or (every > 0 and phase_step % every == 0)

    # -- host-side bookkeeping
    def _log_rows(self, rows):
        for row in rows:
            self.metrics.write(row)
            for event in self.detector.update(row):
                log.warning("drop-off: %s", event)
                if self.primary:
                    dropoff_lib.write_dropoffs(self.ws.path, self.detector.events)

    def _flush(self, count: int | None = None):
        """Reads the oldest ``count`` pending steps' metrics (all when None), in order, and
        writes their rows.

        Steps are read late (up to ``2 * _FETCH_BLOCK``), so the host does not wait for
        each. Under policy 'stop' the first non-finite step ends the run's record there:
        its row is written, the steps dispatched after it (no-ops, the step guards them)
        are dropped unread, and the run reports the step after it (``_stop_at``), however
        late the host read it.
        """
        for _ in range(len(self.pending) if count is None else min(count, len(self.pending))):
            self._read_one(*self.pending.popleft())

    def _read_one(self, phase, step, epoch, m):
        if self._stop_at is not None:
            return  # dispatched after the stop: a no-op step, not part of the record
        # np.asarray, not jax.device_get: on a busy CPU the latter's asynchronous copy
        # cost the host loop ~0.5 ms a step; the array is fully replicated, so the value
        # is this process's copy either way.
        m = unpack_metrics(np.asarray(m))
        self._accumulate_inputs(phase.name, m)
        self._last_train = m
        self._nonfinite += not m["applied"]
        if self.config.train.nonfinite_policy == "stop" and not m["finite"]:
            self._stop_at = step + 1
        logged = not (step - phase.start) % phase.log_every or self._is_last(phase, step)
        if logged or self._stop_at is not None:  # a stop's row is written whatever log_every
            self._log_rows([train_row(phase, step, epoch, m)])

    @staticmethod
    def _is_last(phase, step):
        return step == phase.end - 1

    def _accumulate_inputs(self, phase: str, m):
        acc = self.input_stats.setdefault(phase, [np.zeros(3), np.zeros(3), 0])
        acc[0] = acc[0] + np.asarray(m["input_mean"], np.float64)
        acc[1] = acc[1] + np.asarray(m["input_std"], np.float64)
        acc[2] += 1

    def _input_report(self) -> tuple[dict, list[str]]:
        """Per-channel mean/std of the inputs fed in each phase, and warnings about them."""
        stats = {
            p: {
                "mean": np.round(a[0] / a[2], 4).tolist(),
                "std": np.round(a[1] / a[2], 4).tolist(),
                "batches": a[2],
            }
            for p, a in self.input_stats.items()
            if a[2]
        }
        warnings = []
        for p, s in stats.items():
            if max(abs(x) for x in s["mean"]) > 3 or not 0.1 < min(s["std"]) <= max(s["std"]) < 10:
                warnings.append(
                    f"{p} inputs look unnormalised: per-channel mean {s['mean']}, std {s['std']}"
                )
        if "pretrain" in stats and "finetune" in stats:
            a, b = stats["pretrain"], stats["finetune"]
            far = [
                c
                for c in range(3)
                if abs(b["mean"][c] - a["mean"][c]) > _FAR_MEAN * a["std"][c]
                or not 1 / _FAR_STD < b["std"][c] / a["std"][c] < _FAR_STD
            ]
            if far:
                warnings.append(
                    "fine-tune inputs' statistics are far from pretraining's (channels "
                    f"{far}): mean {b['mean']} vs {a['mean']}, std {b['std']} vs {a['std']}"
                )
        for w in warnings:
            log.warning("%s", w)
        return stats, warnings

    def _progress(self, phase, s, done, elapsed):
        rate = done / max(elapsed, 1e-9)
        eta = (self.end - s) / max(rate, 1e-9)
        m = getattr(self, "_last_train", None)
        loss = f" loss {float(m['loss']):.4f}" if m is not None else ""
        log.info(
            "%s step %d/%d (global %d/%d)%s | %.2f steps/s | ETA %.0fs",
            phase.name,
            s - phase.start,
            phase.steps,
            s,
            self.total,
            loss,
            rate,
            eta,
        )

    def _finish(self, state, status, step, wall) -> dict:
        stats, warnings = self._input_report()
        if self.primary:
            dropoff_lib.write_dropoffs(self.ws.path, self.detector.events)
        fields = dict(
            status=status,
            step=int(step),
            input_stats=stats,
            warnings=warnings,
            compile_time_s=self.compile_s,
            wall_time_s=round(wall, 3),
            # Counted as the steps were read: a diverged run's no-op steps after its stop
            # (dispatched before the host read the stop) are not part of its record.
            nonfinite_steps=self._nonfinite,
            dropoff_count=len(self.detector.events),
            data_pipeline={
                "workers": int(self.config.runtime.data_workers),
                "prefetch": int(self.config.runtime.data_prefetch),
                "lazy_train_splits": [
                    p.name for p in self.phases if not self.data.train(p.name).in_memory
                ],
                "decoder": data_lib.decoder_version(),
            },
            data_wait=self.data_wait.to_dict(),
            corrupt_records=self.corrupt_report(),
        )
        if status in ("done", "diverged"):
            fields["final_param_hash"] = hashing.tree_hash(state.params)
            fields["final_state_hash"] = hashing.tree_hash(
                (state.params, state.batch_stats, state.opt_state)
            )
        self.info.update(fields)
        if self.primary:
            self.ws.update_run(**self.info)
        log.info("%s: %s at step %d in %.1fs", self.ws.path, status, step, wall)
        return self.info
