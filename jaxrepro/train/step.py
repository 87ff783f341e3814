"""The pure train and eval steps.

``train_step(state, batch, aug_root, dropout_root, controls) -> (state, metrics)`` is a pure
function of its arguments: augmentation keys are derived inside from (root, epoch, example id), and
the dropout key from (root, step), so the step needs no key in the state and a resumed run
draws the same numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxrepro import rng
from jaxrepro.data import augment as augment_lib
from jaxrepro.train.update import guarded_update


@struct.dataclass
class TrainState:
    """Everything a step changes. Keys and the data position derive from ``step``."""

    step: jax.Array  # global step (pretrain steps, then fine-tune steps), int32
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite: jax.Array  # number of steps whose update was not applied (non-finite), int32


def normalize(images01: jax.Array, mean, std) -> jax.Array:
    mean = jnp.asarray(mean, images01.dtype)
    std = jnp.asarray(std, images01.dtype)
    return (images01 - mean) / std


def _cross_entropy(logits, labels):
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def step_controls(lr_scale: float = 1.0, clip_norm: float = math.inf) -> jax.Array:
    """A train step's run-time controls: a learning-rate multiplier and a global-norm clip.

    Inputs of the compiled step, not constants, so one program serves training (1, inf:
    bit-identical to no control) and every arm of a diagnosis (jaxrepro/diagnose).
    """
    return jnp.asarray([lr_scale, clip_norm], jnp.float32)


def apply_step(
    state, loss, grads, batch_stats, *, tx, policy: str, update_norm: bool = True, controls=None
):
    """The end of every train step: the non-finite guard, the update, the new state.

    The update is taken when the loss and the gradients are finite (and, with policy
    'stop', no earlier step was skipped); else params, opt_state and batch_stats stay as
    they were and the skip is counted. The update runs under ``lax.cond``, not per-leaf
    selects: the skipped branch costs nothing and the taken one updates the donated Adam
    state in place (train/update.py). ``controls`` (``step_controls``): the learning-rate
    multiplier and the gradient clip applied to this update.

    Returns ``(new_state, {"grad_norm", "update_norm", "finite", "applied"})``.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite if policy == "skip" else finite & (state.nonfinite == 0)
    params, opt_state, norm = guarded_update(
        tx,
        state.params,
        state.opt_state,
        grads,
        apply,
        update_norm=update_norm,
        controls=controls,
    )
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        batch_stats=_select(apply, batch_stats, state.batch_stats),
        opt_state=opt_state,
        nonfinite=state.nonfinite + (~apply).astype(jnp.int32),
    )
    return new_state, {
        "grad_norm": grad_norm,
        "update_norm": norm,
        "finite": finite,
        "applied": apply,
    }


def dropout_rngs(module, dropout_root: jax.Array, step) -> dict | None:
    """``apply``'s rngs for a train step: the step's dropout key, or None without dropout.

    The key is ``rng.step_key(dropout_root, step)`` (``dropout_root`` is the phase's
    stream of the 'dropout' seed), so the mask depends on the seed and the step alone: a
    resumed run draws the same. Without dropout no key is made, and the program is the
    one the step had before models had the option.
    """
    if getattr(module, "dropout_rate", 0.0) > 0:
        return {"dropout": rng.step_key(dropout_root, step)}
    return None


def train_step(
    state: TrainState,
    batch: dict,
    aug_root: jax.Array,
    dropout_root: jax.Array,
    controls: jax.Array,
    *,
    module,
    tx,
    lr_fn,
    phase_start: int,
    augment_cfg,
    mean,
    std,
    policy: str,
    update_norm: bool = True,
):
    """One optimizer step on ``batch`` (uint8 images, labels, example ids, epochs).

    ``controls`` (``step_controls``): the learning-rate multiplier and gradient clip of
    this step; (1, inf) is the configured training, bit for bit.

    A non-finite loss or gradient leaves params, opt_state and batch_stats unchanged.
    With policy 'stop', every later step is a no-op too, so the state stays the last good
    one until the host stops the run; with 'skip' training goes on. ``update_norm=False``
    leaves out the update's norm (logged as NaN; ``jaxrepro bench step`` measures its cost).
    """
    images = augment_lib.augment_batch(
        aug_root, batch["image"], batch["epoch"], batch["id"], augment_cfg
    )
    x = normalize(images, mean, std)
    labels = batch["label"]
    rngs = dropout_rngs(module, dropout_root, state.step)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, new_vars = module.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs=rngs
        )
        loss = _cross_entropy(logits, labels).mean()
        return loss, (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, tail = apply_step(
        state,
        loss,
        grads,
        batch_stats,
        tx=tx,
        policy=policy,
        update_norm=update_norm,
        controls=controls,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
        "grad_norm": tail["grad_norm"],
        "update_norm": tail["update_norm"],
        "param_norm": optax.tree.norm(new_state.params),
        "lr": lr_fn(state.step - phase_start) * controls[0],
        "finite": tail["finite"],
        "applied": tail["applied"],
        # What the model actually saw, per channel: catches a forgotten normalisation.
        "input_mean": jnp.mean(x, axis=(0, 1, 2)),
        "input_std": jnp.std(x, axis=(0, 1, 2)),
    }
    return new_state, metrics


# The order of the scalar metrics in a packed metrics vector; then input_mean, input_std.
PACKED_SCALARS = (
    "loss", "accuracy", "grad_norm", "update_norm", "param_norm", "lr", "finite", "applied"
)  # fmt: skip


def pack_metrics(metrics: dict) -> jax.Array:
    """A train step's metrics as one float32 vector, so the host loop fetches one array a
    step instead of ten (each fetch is host work taken from the step on a busy CPU).

    Exact: every metric is a float32 (or a bool, packed as 0 or 1). ``unpack_metrics``
    turns the fetched vector back into the metrics dict."""
    parts = [jnp.asarray(metrics[k], jnp.float32).reshape(1) for k in PACKED_SCALARS]
    for k in ("input_mean", "input_std"):
        parts.append(jnp.asarray(metrics[k], jnp.float32).reshape(-1))
    return jnp.concatenate(parts)


def unpack_metrics(packed) -> dict:
    """The metrics dict of a fetched ``pack_metrics`` vector (numpy values, bools as bools)."""
    v = np.asarray(packed)
    n = len(PACKED_SCALARS)
    channels = (v.shape[0] - n) // 2
    out = {k: v[i] for i, k in enumerate(PACKED_SCALARS)}
    for k in ("finite", "applied"):
        out[k] = bool(out[k])
    out["input_mean"], out["input_std"] = v[n : n + channels], v[n + channels :]
    return out


def with_packed_metrics(step_fn):
    """``step_fn(state, batch, *inputs)`` returning its metrics packed."""

    def fn(state, batch, *inputs):
        state, metrics = step_fn(state, batch, *inputs)
        return state, pack_metrics(metrics)

    return fn


def make_train_step(**static):
    """The jitted step with its hyperparameters bound; the state buffer is donated."""
    return jax.jit(functools.partial(train_step, **static), donate_argnums=(0,))


def eval_step(params, batch_stats, images, labels, mask, *, module, mean, std):
    """Sums of loss and correct predictions over the unmasked examples of a batch."""
    x = normalize(augment_lib.eval_preprocess(images), mean, std)
    logits = module.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    loss = _cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask)}


def make_eval_step(**static):
    return jax.jit(functools.partial(eval_step, **static))
