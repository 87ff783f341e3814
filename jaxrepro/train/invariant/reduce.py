"""Fixed-order reductions over gradient groups: the only way batch partials are combined.

Float addition is not associative, so a sum over the batch has the bits of the order it
was added in. A data-parallel step sums in an order set by the layout (per-device partial
sums, then an all-reduce whose tree depends on the device count). Here every batch
reduction is first done per group (the same one-group program on every layout), the G
partials are gathered *in group order* on every device, and summed by one pairwise tree
over the group index:

    level 0:  p0  p1  p2  p3  p4  p5  p6  p7
    level 1:  p0+p1   p2+p3   p4+p5   p6+p7
    level 2:  (p0+p1)+(p2+p3)   (p4+p5)+(p6+p7)
    level 3:  ((p0+p1)+(p2+p3)) + ((p4+p5)+(p6+p7))

Each level is an elementwise add of two slices, so the total is the same bits on 1, 2,
4 or 8 devices. No ``psum`` is used anywhere: its summation order belongs to the runtime.

Why the tree runs *after* the gather, on every device, and is never moved before it:
XLA:CPU always lets LLVM contract a multiply and an add into one fused multiply-add
(one rounding instead of two), and whether it does depends on which ops share a kernel.
Gather-then-tree gives every layout the same kernels downstream (the tree is fused into
its consumers, e.g. the Adam update, on 1 device and on 8 alike; on 1 device the
collective is a no-op). A reduce-scatter variant (each device sums a slice of the
gradient, then the sums are gathered) materialises the sum on D > 1 but not on 1 device;
measured, it made Adam's moments differ between 1 and 2 devices from the second step
(exact again with ``--xla_cpu_max_isa=AVX``, which has no FMA instruction).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def tree_sum(stacked: jax.Array) -> jax.Array:
    """Sums ``stacked`` over its leading (group) axis by a fixed pairwise tree.

    Args:
      stacked: array [G, ...], one partial per group, in group order.

    Returns:
      array [...]: ``(p0 + p1) + (p2 + p3) + ...`` level by level; an odd element at
      the end of a level is carried up unchanged.
    """
    if stacked.ndim < 1 or stacked.shape[0] < 1:
        raise ValueError(f"tree_sum needs an array [G, ...] with G >= 1, got {stacked.shape}")
    level = stacked
    while level.shape[0] > 1:
        even = level.shape[0] // 2 * 2
        pairs = level[0:even:2] + level[1:even:2]
        level = jnp.concatenate([pairs, level[even:]]) if even < level.shape[0] else pairs
    return level[0]


def gather_groups(local: jax.Array, axis_name: str | None) -> jax.Array:
    """All partials [G, ...] in group order from this device's [G/D, ...] (no-op if None).

    The mesh assigns contiguous batch shards to devices in axis order, so a tiled
    all_gather along the axis puts group g at row g on every device.
    """
    if axis_name is None:
        return local
    return jax.lax.all_gather(local, axis_name, axis=0, tiled=True)


def combine(parts: list[jax.Array], axis_name: str | None) -> jax.Array:
    """The fixed-tree sum over all G groups of per-group partials (this device's list)."""
    if not parts:
        raise ValueError("combine needs at least one local group partial")
    return tree_sum(gather_groups(jnp.stack(parts), axis_name))


def combine_trees(trees: list, axis_name: str | None):
    """``combine`` for per-group pytrees of float arrays (e.g. per-group gradients).

    All leaves of a group are flattened into one vector first, so a whole gradient
    needs one all_gather; concatenation and slicing are exact, so this gives the same
    bits as combining leaf by leaf. Each device holds all G gradients for a moment
    (G x P values); a reduce-scatter style combination (each device sums a slice, then
    gathers) would need ~P but was measured to change the bits of the update that
    follows, see the module docstring.
    """
    if not trees:
        raise ValueError("combine_trees needs at least one local group tree")
    leaves0, treedef = jax.tree.flatten(trees[0])
    dtypes = {leaf.dtype for leaf in leaves0}
    if len(dtypes) != 1:
        raise ValueError(f"combine_trees needs leaves of one dtype, got {sorted(map(str, dtypes))}")
    flat = [jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(t)]) for t in trees]
    total = combine(flat, axis_name)
    sizes = [int(np.prod(leaf.shape)) for leaf in leaves0]
    offsets = np.cumsum([0, *sizes])
    out = [total[offsets[i] : offsets[i + 1]].reshape(leaf.shape) for i, leaf in enumerate(leaves0)]
    return jax.tree.unflatten(treedef, out)
