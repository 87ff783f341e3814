"""``stored(a)``: ``a`` as a buffer XLA writes once, not an expression it re-evaluates.

XLA fuses a cheap elementwise producer into each of its consumers, and a fused loop
recomputes the producer at every index it reads. Mostly that saves memory traffic; in
two places of the ResNet step it costs far more (results/bench/NOTES.md, session 6):

* the deterministic max-pool's backward reads the window selection at nine offsets, so
  the selection (nine strided reads, eight compares) ran nine times per input cell;
* a residual block's output, ``relu(bn3(conv3) + shortcut)``, is read by the next block's
  first convolution and by its residual add. XLA stored it for the convolution but also
  fused it into the add, recursively: the fusion making a stage's k-th block output
  re-read the convolution outputs of every block before it (5k + 1 operands).

``lax.optimization_barrier`` does not survive to XLA:CPU's fusion passes, and a reduction
used as a barrier costs up to 40x the value's own computation. What XLA keeps is a
``while`` loop whose trip count it cannot know: ``stored`` carries ``a`` through one
whose condition is ``a[0] < -inf`` (false for every value, NaN included), so the body
never runs, the result is ``a`` bit for bit, and the producer writes straight into the
loop's buffer. Its derivative is the identity.

Only on CPU: elsewhere (GPU, TPU) a loop condition computed on the device may cost a
round trip to the host per loop, and their fusion heuristics were not measured here, so
``stored`` is the identity there. On a data-parallel CPU mesh (audits, tests) the
condition reads one element of a batch-sharded value, so XLA adds an all-reduce of that
scalar per call; exact, and small next to a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_jvp
def stored(a: jax.Array) -> jax.Array:
    """``a`` unchanged; on CPU materialised once by XLA (see the module doc)."""
    if jax.default_backend() != "cpu" or a.size == 0:
        return a
    never = a.reshape(-1)[0] < _lowest(a.dtype)

    def body(carry):  # never runs; written so that XLA cannot see it as the identity
        _, scale, value = carry
        return jnp.bool_(False), scale + 1, value * scale.astype(value.dtype)

    return lax.while_loop(lambda c: c[0], body, (never, jnp.int32(1), a))[2]


def _lowest(dtype):
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.array(-jnp.inf, dtype)
    return jnp.array(jnp.iinfo(dtype).min, dtype)


@stored.defjvp
def _stored_jvp(primals, tangents):
    (a,), (t,) = primals, tangents
    return stored(a), t
