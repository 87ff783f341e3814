"""Creating train states: initialisation, the fine-tune transition, and restore targets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrepro import machine, models, rng
from jaxrepro.errors import ConfigError
from jaxrepro.train import optimizer as optimizer_lib
from jaxrepro.train.step import TrainState


@dataclasses.dataclass
class Phase:
    """One training phase: which data, which model head, which optimizer, which steps."""

    name: str
    start: int  # first global step
    steps: int
    batch_size: int
    num_classes: int
    module: object
    tx: object
    lr_fn: object
    eval_every: int
    log_every: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def portable_chunk(config, conv_impl: str) -> int:
    """The contraction chunk of portable CPU mode (jaxrepro.machine), or 0."""
    if not config.determinism.portable or jax.default_backend() != "cpu":
        return 0
    if conv_impl != "matmul":
        raise ConfigError(
            f"determinism.portable needs model.conv_impl 'matmul' or 'auto' on CPU (got "
            f"{conv_impl!r}): XLA's own convolution blocks its sums by the CPU's caches"
        )
    return machine.PORTABLE_CHUNK


def build_module(config, num_classes: int, conv_impl: str):
    m = config.model
    return models.build(
        m.name,
        num_classes,
        stem=m.stem,
        zero_init_residual=m.zero_init_residual,
        conv_impl=conv_impl,
        maxpool_impl=m.maxpool_impl,
        bn_impl=m.bn_impl,
        dtype=m.dtype,
        width=m.width,
        contract_chunk=portable_chunk(config, conv_impl),
        dropout_rate=m.dropout_rate,
    )


def make_phase(config, name, start, steps, num_classes, conv_impl) -> Phase:
    p = config[name]
    return Phase(
        name=name,
        start=start,
        steps=steps,
        batch_size=p.batch_size,
        num_classes=num_classes,
        module=build_module(config, num_classes, conv_impl),
        tx=optimizer_lib.build(config, name, steps),
        lr_fn=optimizer_lib.schedule(config, name, steps),
        eval_every=p.eval_every,
        log_every=p.log_every,
    )


def init_variables(module, key, image_size: int):
    """``module.init``'s values bit for bit, without compiling the model to initialise it.

    ``models.init_variables`` draws every parameter in one small program (models/init.py).
    """
    return models.init_variables(module, key, image_size)


def load_pretrained(config, params, batch_stats):
    """Replaces initialised weights by a ported checkpoint (``jaxrepro port``) when configured.

    The backbone must match the configured architecture exactly; the classifier is taken
    over only if its shape fits (else the freshly initialised one is kept). Reading the
    directory needs NumPy only (``jaxrepro.ported``), not torch.
    """
    if not config.init_from:
        return params, batch_stats
    from jaxrepro import ported
    from jaxrepro.errors import CheckpointError

    try:
        variables, meta = ported.load(config.init_from)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"init_from={config.init_from!r}: {e}") from e
    if meta.get("arch") != config.model.name:
        raise CheckpointError(
            f"init_from={config.init_from!r} holds {meta.get('arch')!r} weights, "
            f"but the config's model is {config.model.name!r}"
        )
    loaded = jax.tree.map(jnp.asarray, dict(variables["params"]))
    mismatched = _mismatched_shapes(params, loaded)
    head = optimizer_lib.HEAD
    if any(not k.startswith(head + "/") for k in mismatched):
        raise CheckpointError(
            f"init_from={config.init_from!r} does not fit the model: {sorted(mismatched)[:8]}"
        )
    if mismatched:  # another label set: keep our head
        loaded[head] = params[head]
    return loaded, jax.tree.map(jnp.asarray, dict(variables["batch_stats"]))


def _mismatched_shapes(a, b) -> list[str]:
    from jaxrepro.plumbing.hashing import path_str

    fa = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
    fb = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
    return [k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)]


def initial_state(phase: Phase, params, batch_stats, step: int = 0) -> TrainState:
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=phase.tx.init(params),
        nonfinite=jnp.asarray(0, jnp.int32),
    )


def new_head(config, seeds: dict, params, num_classes: int):
    """Replaces the classifier with one drawn from the ``head`` seed (nothing else changes)."""
    feat = models.feature_dim(config.model.name, width=config.model.width)
    head = models.init_head(rng.factor_root("head", seeds["head"]), feat, num_classes)
    params = dict(params)
    params[optimizer_lib.HEAD] = head
    return params


def to_finetune(config, seeds, state: TrainState, phase: Phase) -> TrainState:
    """The fine-tune state at the phase boundary: new head (by default), fresh Adam."""
    params = state.params
    old_classes = params[optimizer_lib.HEAD]["bias"].shape[-1]
    if config.finetune.new_head or old_classes != phase.num_classes:
        params = new_head(config, seeds, params, phase.num_classes)
    return TrainState(
        step=state.step,
        params=params,
        batch_stats=state.batch_stats,
        opt_state=phase.tx.init(params),
        nonfinite=state.nonfinite,
    )


def abstract_state(fn, *args):
    """The shapes/dtypes a state would have (restore target), computed without any work."""
    return jax.eval_shape(fn, *args)
