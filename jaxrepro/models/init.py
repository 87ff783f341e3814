"""Initialisation with the bits of ``module.init``, compiled in about a second.

``jax.jit(module.init)`` compiles the model's forward pass and one random-number kernel
per parameter: with ``jax_threefry_partitionable`` each draw is a separate threefry +
erf_inv fusion that LLVM compiles on its own (~0.3-0.7 s each on 2 cores), so a
ResNet-50 init took 8-20 s to compile. ``init_variables`` gives the same values:

1. It traces ``module.init`` once with the draws of ``layers``' initialisers *recorded*
   instead of made (each records its key, shape and distribution and returns a
   placeholder). The forward pass is dead code, so XLA drops it.
2. All recorded draws are made by one elementwise program over a padded [blocks, B]
   grid: block b holds elements ``start[b] .. start[b] + B`` of parameter ``seg[b]``,
   and element i of parameter p gets ``threefry2x32(key_p, (0, i))`` -- exactly the
   counter that ``jax.random`` uses for the i-th element of a draw of any shape under
   ``jax_threefry_partitionable`` -- then the same bits-to-float arithmetic as
   ``jax.random.uniform`` / ``normal`` (see ``_finish``).

The result is bit-for-bit that of ``module.init`` (tests/test_fast_init.py checks it);
anything the recorder does not know (another initialiser, a non-float32 parameter,
another PRNG implementation) is drawn the ordinary way inside the same program.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

_BLOCK = 4096  # elements per grid row: padding waste <= _BLOCK per parameter
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("jaxrepro_init_recorder", default=None)
# jax.random.normal draws uniform on [nextafter(-1, 0), 1) and returns sqrt(2) * erf_inv(u).
_NORMAL_LO = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
_SQRT2 = np.float32(np.sqrt(2))


@dataclasses.dataclass
class _Draw:
    key: jax.Array
    shape: tuple[int, ...]
    kind: str  # 'normal' (times stddev) | 'uniform' (on [lo, hi))
    a: float  # normal: stddev as jax computes it (float32); uniform: lo
    b: float  # uniform: hi
    placeholder: jax.Array


def normal_or_record(key, shape, dtype, variance: float, draw):
    """``draw()`` (a variance-scaled normal), or a recorded placeholder while recording.

    ``variance`` is the Python float jax's ``variance_scaling`` computes; the recorded
    scale is ``float32(sqrt(2)) * sqrt(float32(variance))``, the single constant XLA folds
    the two multiplications of ``jax.random.normal(...) * sqrt(variance)`` into.
    """
    rec = _RECORDER.get()
    if rec is None or not _recordable(key, dtype):
        return draw()
    stddev = _SQRT2 * np.sqrt(np.float32(variance))
    return rec.add(_Draw(key, tuple(shape), "normal", stddev, 0.0, jnp.zeros(shape, dtype)))


def uniform_or_record(key, shape, dtype, lo: float, hi: float, draw):
    """``draw()`` (``jax.random.uniform(key, shape, dtype, lo, hi)``), or a placeholder."""
    rec = _RECORDER.get()
    if rec is None or not _recordable(key, dtype):
        return draw()
    return rec.add(_Draw(key, tuple(shape), "uniform", lo, hi, jnp.zeros(shape, dtype)))


def _recordable(key, dtype) -> bool:
    if jnp.dtype(dtype) != jnp.float32 or not jax.config.jax_threefry_partitionable:
        return False
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and (
        str(jax.random.key_impl(key)) == "threefry2x32"
    )


class _Recorder:
    def __init__(self):
        self.draws: list[_Draw] = []

    def add(self, draw: _Draw) -> jax.Array:
        self.draws.append(draw)
        return draw.placeholder


# ----------------------------------------------------------------------------- the program


def _tables(draws: list[_Draw]):
    """Per grid row: parameter index and first element; per parameter: first row."""
    rows = [math.ceil(math.prod(d.shape) / _BLOCK) for d in draws]
    seg = np.repeat(np.arange(len(draws), dtype=np.int32), rows)
    first_row = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    start = (np.arange(len(seg)) - first_row[seg]) * _BLOCK
    return seg, start.astype(np.uint32), first_row


def _per_param_constants(draws: list[_Draw]):
    """float32 (lo, span, scale) and is-normal, laid out like jax.random's arithmetic."""
    lo, span, scale, normal = [], [], [], []
    for d in draws:
        if d.kind == "normal":
            low, high = _NORMAL_LO, np.float32(1.0)
        else:
            low, high = np.float32(d.a), np.float32(d.b)
        lo.append(low)
        span.append(np.float32(high - low))
        scale.append(np.float32(d.a) if d.kind == "normal" else np.float32(1.0))
        normal.append(d.kind == "normal")
    f32 = np.float32
    return (np.array(lo, f32), np.array(span, f32), np.array(scale, f32), np.array(normal))


def _finish(bits, lo, span, scale, is_normal):
    """jax.random.uniform's bits -> [lo, hi) float32, then normal's erf_inv where asked."""
    mantissa = lax.shift_right_logical(bits, jnp.uint32(32 - 23)) | jnp.uint32(0x3F800000)
    floats = lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    u = lax.max(lo, floats * span + lo)
    return jnp.where(is_normal, lax.erf_inv(u) * scale, u)


def _draw_all(draws: list[_Draw]) -> jax.Array:
    """Every recorded draw in one [rows, _BLOCK] float32 grid (traced, inside the jit)."""
    seg, start, _ = _tables(draws)
    lo, span, scale, normal = _per_param_constants(draws)
    keys = jnp.stack([jax.random.key_data(d.key) for d in draws])  # [P, 2] uint32
    # A barrier, so XLA does not constant-fold the [rows, _BLOCK] counters at compile time.
    seg, start = lax.optimization_barrier((jnp.asarray(seg), jnp.asarray(start)))
    counts = start[:, None] + lax.iota(jnp.uint32, _BLOCK)[None, :]
    k1 = jnp.broadcast_to(keys[seg, 0][:, None], counts.shape)
    k2 = jnp.broadcast_to(keys[seg, 1][:, None], counts.shape)
    hi, lo_bits = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counts), counts)
    col = seg[:, None]
    return _finish(
        hi ^ lo_bits, jnp.asarray(lo)[col], jnp.asarray(span)[col], jnp.asarray(scale)[col],
        jnp.asarray(normal)[col],
    )  # fmt: skip


# ----------------------------------------------------------------------------- public


_COMPILED: dict = {}


def _build(module, image_size: int, channels: int, key):
    """Traces and compiles the fast init for one (module, input shape); returns it and
    the static layout (which output leaf is which recorded draw)."""
    layout = {}

    def program(root):
        recorder = _Recorder()
        token = _RECORDER.set(recorder)
        try:
            x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
            variables = module.init({"params": root}, x, train=False)
        finally:
            _RECORDER.reset(token)
        ids = {id(d.placeholder): i for i, d in enumerate(recorder.draws)}
        leaves, treedef = jax.tree_util.tree_flatten(variables)
        slots = [ids.get(id(leaf)) for leaf in leaves]
        layout.update(treedef=treedef, slots=slots, draws=[
            (d.shape, d.placeholder.dtype) for d in recorder.draws
        ])  # fmt: skip
        kept = [None if s is not None else leaf for leaf, s in zip(leaves, slots, strict=True)]
        grid = _draw_all(recorder.draws) if recorder.draws else jnp.zeros((0, _BLOCK))
        return kept, grid

    compiled = jax.jit(program).lower(key).compile()
    if layout["draws"]:
        _, _, first_row = _tables([_Draw(None, s, "", 0, 0, None) for s, _ in layout["draws"]])
    else:
        first_row = np.zeros(0, np.int64)
    layout["first_row"] = first_row
    return compiled, layout


def init_variables(module, key: jax.Array, image_size: int, channels: int = 3):
    """``(params, batch_stats)`` equal bit for bit to ``module.init`` at batch 1.

    A drop-in for ``train.state.init_variables``: same arguments, same result, about a
    second of compile instead of the whole model's init program. Under a trace (e.g.
    ``jax.eval_shape``) it simply traces ``module.init``.
    """
    if isinstance(key, jax.core.Tracer):
        x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
        variables = module.init({"params": key}, x, train=False)
        return variables["params"], variables.get("batch_stats", {})
    cache_key = (module, int(image_size), int(channels), key.shape, str(key.dtype))
    if cache_key not in _COMPILED:
        _COMPILED[cache_key] = _build(module, int(image_size), int(channels), key)
    compiled, layout = _COMPILED[cache_key]
    kept, grid = compiled(key)
    flat = np.asarray(grid).reshape(-1)
    leaves = []
    for leaf, slot in zip(kept, layout["slots"], strict=True):
        if slot is None:
            leaves.append(leaf)
            continue
        shape, dtype = layout["draws"][slot]
        begin = int(layout["first_row"][slot]) * _BLOCK
        values = flat[begin : begin + math.prod(shape)].reshape(shape)
        leaves.append(jnp.asarray(values, dtype))
    variables = jax.tree_util.tree_unflatten(layout["treedef"], leaves)
    return variables["params"], variables.get("batch_stats", {})
