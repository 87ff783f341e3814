"""What a run is before it runs: data, phases, keys, batches, initial state, restore target.

``RunSetup(config, origin)`` is built without a checkpoint manager and writes nothing: the
training loop runs it, and the PyTorch reference trainer, study analysis (which example
ids made a batch), replay, diagnosis and the benchmarks use it to get the very same data,
phases, keys, batches and states.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxrepro import config as config_lib
from jaxrepro import data as data_lib
from jaxrepro import parallel, rng
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.data import order as order_lib
from jaxrepro.errors import CheckpointError, ConfigError
from jaxrepro.train import state as state_lib
from jaxrepro.train.step import step_controls
from jaxrepro.workdir import shown

log = logging.getLogger("jaxrepro")


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
    config: dict | None = None  # the original's config.json (its optimizer's structure)


def claimed_config(config, origin: Origin | None) -> dict:
    """config.json of a run: the config, and a branch's origin (another origin is refused)."""
    claimed = config_lib.to_dict(config)
    if origin is not None:
        claimed["replay"] = dict(
            origin.info, from_step=origin.step, until=origin.until, skip_batches=origin.skip_batches
        )
    return claimed


class RunSetup:
    """One run's data, phases, keys and batches, and how to make or restore its state."""

    def __init__(self, config, origin: Origin | None = None):
        self.config = config
        self.origin = origin
        self.seeds = rng.resolve_seeds(config)
        self.roots = rng.roots(self.seeds)
        self.data_key = order_lib.host_key(self.roots["data"])
        self.conv_impl = resolve_conv_impl(config)
        self.par = parallel.DataParallel(config.parallel.num_devices)
        self.data = load_data(config)
        self.phases = make_phases(config, self.data, self.conv_impl)
        self.total = self.phases[-1].end
        self.end = self.total
        if origin is not None and origin.until is not None:
            self.end = min(origin.until, self.total)
        self._step_inputs = {}
        self._abstract_init = None

    # -- phases
    def phase_of(self, step: int) -> state_lib.Phase:
        for p in self.phases:
            if step < p.end:
                return p
        return self.phases[-1]

    def phase_named(self, name: str) -> state_lib.Phase:
        return next(p for p in self.phases if p.name == name)

    def first_phase(self) -> state_lib.Phase:
        return next(p for p in self.phases if p.steps > 0)

    # -- states
    def init_state(self, key=None):
        """The state at step 0, from the ``init`` seed (and ``init_from``, if set).

        ``key``: the init root (default ``roots['init']``); ``abstract_init_state`` passes it
        as an argument so that its trace only traces, without running the fast init.
        """
        p0 = self.phases[0]
        key = self.roots["init"] if key is None else key
        params, batch_stats = state_lib.init_variables(p0.module, key, self.config.data.image_size)
        params, batch_stats = state_lib.load_pretrained(self.config, params, batch_stats)
        state = state_lib.initial_state(p0, params, batch_stats)
        if self.first_phase().name == "finetune":
            state = state_lib.to_finetune(self.config, self.seeds, state, self.phases[1])
        return state

    def abstract_init_state(self):
        """``init_state()``'s shapes and dtypes, traced (not run) once per setup."""
        if self._abstract_init is None:
            self._abstract_init = jax.eval_shape(self.init_state, self.roots["init"])
        return self._abstract_init

    def to_finetune(self, state, phase):
        """The pretrain -> fine-tune transition (new head, fresh optimizer), replicated."""
        return self.par.replicate(state_lib.to_finetune(self.config, self.seeds, state, phase))

    def restore(self, ckpts, step: int, recorded: dict | None = None):
        """(state, its phase name) of checkpoint ``step`` of ``ckpts``, on the mesh.

        The state's shapes come from ``restore_target``, without running the model's init.

        ``recorded``: the config of the run that wrote ``ckpts``, when it is not this one
        (a branch). At the fine-tune start the optimizer state is fresh by construction
        (``to_finetune``); if the recorded optimizer has another structure than this
        config's (gradient clipping or weight decay switched on, a backbone lr multiplier),
        the weights are restored and this config's fresh optimizer state is made, as a run
        of this config has it there. Elsewhere the optimizer state must fit as it is.
        """
        target, fresh_tx = self.restore_target(step, recorded)
        state, meta = ckpts.restore(step, target, expect={"model": self.config.model.name})
        if fresh_tx is not None:
            state = state.replace(opt_state=self.par.replicate(fresh_tx.init(state.params)))
            log.info("fresh fine-tune optimizer state of this config at step %d", step)
        log.info(
            "restored checkpoint %d (%s) from %s", step, meta.get("phase"), shown(ckpts.directory)
        )
        return state, meta["phase"]

    def restore_target(self, step: int, recorded: dict | None = None):
        """(the abstract state checkpoint ``step`` restores into, replicated on the mesh;
        the fresh optimizer to make after it, or None): see ``restore``. Without a
        ``recorded`` config the target is the restored state's exact shape and sharding, so a
        program can be compiled for it while the checkpoint is read."""
        phase = self.phase_of(step)
        if step == self.total:
            phase = self.phases[-1]
        target = self.abstract_init_state()
        fine_tune_start = (
            phase.name == "finetune"
            and self.first_phase().name == "pretrain"
            and step == phase.start
        )
        if phase.name == "finetune" and self.first_phase().name == "pretrain":
            target = jax.eval_shape(
                lambda s: state_lib.to_finetune(self.config, self.seeds, s, phase), target
            )
        fresh_tx = None
        if recorded is not None and fine_tune_start:
            recorded_tx = self._recorded_tx(recorded, phase)
            stored = jax.eval_shape(recorded_tx.init, target.params)
            if jax.tree.structure(stored) != jax.tree.structure(target.opt_state):
                target, fresh_tx = target.replace(opt_state=stored), phase.tx
        return self.par.replicate(target), fresh_tx  # restore straight into replicated arrays

    @staticmethod
    def _recorded_tx(recorded: dict, phase):
        from jaxrepro import config as config_lib
        from jaxrepro.train import optimizer as optimizer_lib

        stored = {k: v for k, v in recorded.items() if k != "replay"}
        return optimizer_lib.build(config_lib.from_dict(stored), phase.name, phase.steps)

    def restore_origin(self):
        """(state, its phase name) of the origin's checkpoint, read from the original run."""
        origin = self.origin
        src = Checkpoints(origin.checkpoint_dir, read_only=True)
        try:
            if origin.step not in src.steps():
                raise CheckpointError(
                    f"no checkpoint {origin.step} in {src.directory} (have {src.steps()})"
                )
            return self.restore(src, origin.step, recorded=origin.config)
        finally:
            src.close()

    # -- keys
    def keys(self, phase):
        """(augmentation root, dropout root) of ``phase``, as the train step takes them."""
        return (
            rng.phase_root(self.roots["aug"], phase.name),
            rng.phase_root(self.roots["dropout"], phase.name),
        )

    def step_inputs(self, phase):
        """``keys(phase)`` and the default ``step_controls()`` (the configured training),
        replicated on the mesh: the compiled step's inputs after the state and batch."""
        if phase.name not in self._step_inputs:
            inputs = (*self.keys(phase), step_controls())
            self._step_inputs[phase.name] = self.par.replicate(inputs)
        return self._step_inputs[phase.name]

    # -- batches
    def batch_ids(self, phase, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example ids, their epochs) of the global batch of ``step``."""
        position = step - phase.start
        if self.origin is not None and step >= self.origin.step:
            position += self.origin.skip_batches
        return order_lib.batch_ids(
            self.data_key,
            phase.name,
            position,
            phase.batch_size,
            len(self.data.train(phase.name)),
            self.config.data.remainder,
        )

    def batch(self, phase, step: int) -> dict:
        """The global batch of ``step`` as host arrays (every host's rows)."""
        return self.read(phase, *self.batch_ids(phase, step))

    def device_batch(self, phase, step: int) -> tuple[dict, int]:
        """(the global batch sharded over the mesh, the epoch of its first example).

        This host reads only its own rows of the global batch (``parallel.host_slice``).
        """
        return self.device_batch_of(phase, *self.batch_ids(phase, step))

    def device_batch_of(self, phase, ids, epochs) -> tuple[dict, int]:
        """Like ``device_batch``, for given global example ids and epochs."""
        local = self.read(phase, self.par.host_slice(ids), self.par.host_slice(epochs))
        return self.par.shard_batch(local, phase.batch_size), int(epochs[0])

    def read(self, phase, ids, epochs) -> dict:
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
