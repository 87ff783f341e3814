"""The optax optimizer of a phase, built in one place from the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from optax._src import numerics

HEAD = "fc"  # the classifier's top-level param name (jaxrepro.models layout)


def learning_rate(config, phase: str):
    """The peak learning rate of a phase."""
    if phase == "finetune" and config.finetune.lr is not None:
        return float(config.finetune.lr)
    return float(config.optimizer.lr)


def _phase_schedule(config, phase: str) -> tuple[str, int]:
    """(schedule kind, warmup steps) of a phase: fine-tuning may set its own."""
    opt = config.optimizer
    kind, warmup = opt.schedule, int(opt.warmup_steps)
    if phase == "finetune":
        ft = config.finetune
        if ft.get("schedule") is not None:
            kind = ft.schedule
        if ft.get("warmup_steps") is not None:
            warmup = int(ft.warmup_steps)
    return kind, warmup


def schedule(config, phase: str, total_steps: int) -> optax.Schedule:
    """Linear warmup (optional) then constant or cosine to 0 over the phase."""
    kind, warmup = _phase_schedule(config, phase)
    peak = learning_rate(config, phase)
    warmup = min(warmup, max(total_steps - 1, 0))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else peak, peak, warmup, max(total_steps, warmup + 1), end_value=0.0
        )
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    return optax.constant_schedule(peak)


def scale_by_learning_rate(lr_schedule) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_learning_rate(lr_schedule)``, with a run-time multiplier.

    ``update(..., lr_scale=s)`` scales by ``-(lr(count) * s)``; without it (or with s = 1)
    the step size and so the updates are optax's own, bit for bit. The state is optax's
    ``ScaleByScheduleState``, so checkpoints are unchanged.
    """

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, lr_scale=None, **extra):
        del params, extra
        lr = lr_schedule(state.count)
        if lr_scale is not None:
            lr = lr * lr_scale
        step_size = -1 * lr
        updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=numerics.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def _adam(config, lr_schedule) -> optax.GradientTransformation:
    opt = config.optimizer
    parts = [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)]
    if opt.weight_decay:
        # Decoupled weight decay (AdamW): applied to the update, scaled by the lr below.
        parts.append(optax.add_decayed_weights(opt.weight_decay))
    parts.append(scale_by_learning_rate(lr_schedule))
    return optax.chain(*parts)


def _labels(params):
    flat = traverse_util.flatten_dict(params)
    labels = {k: ("head" if k[0] == HEAD else "backbone") for k in flat}
    return traverse_util.unflatten_dict(labels)


def build(config, phase: str, total_steps: int) -> optax.GradientTransformation:
    """Adam for ``phase``; in fine-tuning the backbone may be frozen or get a lr multiplier."""
    lr = schedule(config, phase, total_steps)
    opt = config.optimizer
    head_tx = _adam(config, lr)
    clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []
    if phase != "finetune":
        return optax.chain(*clip, head_tx)
    ft = config.finetune
    if ft.freeze_backbone:
        backbone_tx = optax.set_to_zero()
    elif ft.backbone_lr_mult == 1.0:
        return optax.chain(*clip, head_tx)
    else:
        mult = float(ft.backbone_lr_mult)
        backbone_tx = _adam(config, lambda count: lr(count) * mult)
    return optax.chain(
        *clip, optax.multi_transform({"head": head_tx, "backbone": backbone_tx}, _labels)
    )


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)
