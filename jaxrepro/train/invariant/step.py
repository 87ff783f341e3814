"""The device-count-invariant train step: same inputs and outputs as ``train.step.train_step``.

The global batch is always cut into G groups of B/G consecutive examples; device d of D
holds groups d*G/D .. (d+1)*G/D - 1 (its contiguous batch shard under ``P('data')``)
and runs the identical one-group program for each. Every reduction over the batch (the
loss, the correct count, the input statistics, every BatchNorm sum and its backward, and
the weight gradients of the per-group parameter copies) is a per-group partial, gathered
in group order and summed by one fixed pairwise tree (``reduce``); nothing uses ``psum``.
So the combined gradient, the Adam update computed from it on every device, the new
state and every metric are the same bits on 1, 2, 4 or 8 devices, within one process
setup (device-count flag and CPU threads: see ``setup.py``). That also rests on XLA
compiling the replicated part (the tree sums' consumers, Adam) alike in every layout,
which the gather-then-tree order gives (see ``reduce.py``); the tests and the bench
check the bits, they do not assume them.

Non-finite policy: the same as ``train_step`` ('skip' / 'stop' via ``state.nonfinite``),
decided from the combined loss and gradient norm, so every layout decides alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrepro.data import augment as augment_lib
from jaxrepro.train.invariant import grouped_model, reduce
from jaxrepro.train.step import TrainState, apply_step, normalize, with_packed_metrics

AXIS = "data"
POLICIES = ("skip", "stop")
# The hyperparameters bound into the step, as for ``train.step.make_train_step``.
STATIC = {"module", "tx", "lr_fn", "phase_start", "augment_cfg", "mean", "std", "policy"}


def check_layout(batch_size: int, groups: int, devices: int) -> int:
    """Examples per group; ValueError unless ``groups | batch_size`` and ``devices | groups``."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if batch_size % groups:
        raise ValueError(f"batch size {batch_size} is not divisible by groups={groups}")
    if groups % devices:
        raise ValueError(
            f"groups={groups} is not divisible by the {devices} devices of the mesh's "
            f"'{AXIS}' axis (each device must hold the same number of whole groups)"
        )
    return batch_size // groups


def _split(x: jax.Array, parts: int) -> list[jax.Array]:
    size = x.shape[0] // parts
    return [x[i * size : (i + 1) * size] for i in range(parts)]


def _input_stats(xs, axis_name, count: int):
    """Per-channel mean and (two-pass) std of the inputs, combined over the groups."""
    mean = reduce.combine([jnp.sum(x, axis=(0, 1, 2)) for x in xs], axis_name) / count
    sq = [jnp.sum(jnp.square(x - mean), axis=(0, 1, 2)) for x in xs]
    return mean, jnp.sqrt(reduce.combine(sq, axis_name) / count)


def _local_groups(batch, aug_root, augment_cfg, mean, std, local: int):
    """This device's groups, augmented per example and normalised (one array per group)."""
    images, epochs, ids = (_split(batch[k], local) for k in ("image", "epoch", "id"))
    return [
        normalize(augment_lib.augment_batch(aug_root, im, ep, i, augment_cfg), mean, std)
        for im, ep, i in zip(images, epochs, ids, strict=True)
    ]


def _grads(state, xs, labels, *, module, groups, batch_size, axis_name):
    """Per-group loss sums and logits, combined gradient, new running statistics."""
    copies = [state.params for _ in xs]  # separate inputs: one gradient per group

    def forward(copies):
        logits, stats = grouped_model.grouped_apply(
            module, copies, state.batch_stats, xs, groups=groups, axis_name=axis_name
        )
        ce = [
            optax.softmax_cross_entropy_with_integer_labels(lg, lb)
            for lg, lb in zip(logits, labels, strict=True)
        ]
        return [jnp.sum(c) for c in ce], (logits, stats)

    loss_sums, vjp_fn, (logits, stats) = jax.vjp(forward, copies, has_aux=True)
    # d(total loss)/d(group loss sum) = 1/B for every group: the loss is sum / B.
    seed = [jnp.full((), 1.0 / batch_size, jnp.float32) for _ in loss_sums]
    (group_grads,) = vjp_fn(seed)
    grads = reduce.combine_trees(group_grads, axis_name)
    return loss_sums, logits, grads, stats


def invariant_train_step(
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
    groups: int,
    axis_name: str | None = AXIS,
):
    """One optimizer step on this device's shard of the batch (run inside ``shard_map``).

    Same arguments, outputs and metrics as ``train.step.train_step``, plus ``groups`` (G)
    and ``axis_name`` (the mesh axis, None when one device runs all G groups outside a
    mesh). ``batch`` holds this device's B/D examples.
    """
    # No dropout here: grouped_model.check_module refuses a module with dropout_rate > 0.
    del dropout_root
    if policy not in POLICIES:
        raise ValueError(f"unknown nonfinite policy {policy!r}; valid: {', '.join(POLICIES)}")
    devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    local = groups // devices
    batch_size = batch["image"].shape[0] * devices
    check_layout(batch_size, groups, devices)
    xs = _local_groups(batch, aug_root, augment_cfg, mean, std, local)
    labels = _split(batch["label"], local)
    loss_sums, logits, grads, batch_stats = _grads(
        state, xs, labels, module=module, groups=groups, batch_size=batch_size,
        axis_name=axis_name,
    )  # fmt: skip
    loss = reduce.combine(loss_sums, axis_name) / batch_size
    hits = [
        jnp.sum(jnp.argmax(lg, -1) == lb, dtype=jnp.int32)
        for lg, lb in zip(logits, labels, strict=True)
    ]
    accuracy = reduce.combine(hits, axis_name).astype(jnp.float32) / batch_size
    new_state, tail = apply_step(
        state, loss, grads, batch_stats, tx=tx, policy=policy, controls=controls
    )
    pixels = batch_size * xs[0].shape[1] * xs[0].shape[2]
    input_mean, input_std = _input_stats(xs, axis_name, pixels)
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "grad_norm": tail["grad_norm"],
        "update_norm": tail["update_norm"],
        "param_norm": optax.tree.norm(new_state.params),
        "lr": lr_fn(state.step - phase_start) * controls[0],
        "finite": tail["finite"],
        "applied": tail["applied"],
        "input_mean": input_mean,
        "input_std": input_std,
    }
    return new_state, metrics


def make_invariant_train_step(
    *, mesh: Mesh, groups: int, donate: bool = True, packed_metrics: bool = False, **static
):
    """The jitted invariant step over ``mesh``'s 'data' axis, hyperparameters bound.

    Args:
      mesh: a Mesh with a 'data' axis of D devices (D must divide ``groups``).
      groups: G, the fixed number of gradient groups (divides every batch size).
      donate: donate the state buffer (as ``train.step.make_train_step`` does).
      packed_metrics: return the metrics as one vector (``train.step.pack_metrics``).
      **static: ``module, tx, lr_fn, phase_start, augment_cfg, mean, std, policy``, as
        for ``train.step.make_train_step``.

    Returns:
      ``step(state, batch, aug_root, dropout_root, controls) -> (state, metrics)``: batch
      arrays global [B, ...] (placed with ``batch_sharding(mesh)``, or host arrays), state
      replicated (``replicated(mesh)``); outputs replicated on the mesh.
    """
    if AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh needs a {AXIS!r} axis, got axes {mesh.axis_names}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"the mesh must have only the {AXIS!r} axis, got {mesh.axis_names}")
    check_layout(groups, groups, mesh.shape[AXIS])
    missing, unknown = sorted(STATIC - set(static)), sorted(set(static) - STATIC)
    if missing or unknown:
        raise ValueError(f"step arguments: missing {missing}, unknown {unknown}")
    if static.get("policy") not in POLICIES:
        raise ValueError(f"unknown nonfinite policy {static.get('policy')!r}")
    grouped_model.check_module(static.get("module"))
    body = functools.partial(invariant_train_step, groups=groups, axis_name=AXIS, **static)
    # Outputs are computed from gathered, tree-summed values: the same on every device.
    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(), P(), P()),
        out_specs=(P(), P()),
        check_vma=False,
    )
    if packed_metrics:
        sharded = with_packed_metrics(sharded)
    rep, shard = replicated(mesh), batch_sharding(mesh)
    return jax.jit(
        sharded,
        in_shardings=(rep, shard, rep, rep, rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,) if donate else (),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of the state, the keys and the metrics: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of batch arrays: contiguous shards of the batch axis over 'data'."""
    return NamedSharding(mesh, P(AXIS))


def data_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh ('data',) over the first ``devices`` devices (all when None)."""
    avail = jax.devices()
    n = len(avail) if devices is None else devices
    if not 1 <= n <= len(avail):
        raise ValueError(f"asked for {devices} devices, {len(avail)} are visible")
    return Mesh(np.array(avail[:n]), (AXIS,))
