"""train/step.py: a step's metrics packed into one vector come back bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.train.step import PACKED_SCALARS, pack_metrics, unpack_metrics, with_packed_metrics

_SPECIAL = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 3.4e38, -1.5], np.float32)


def _metrics(rng, channels, finite=True, applied=False):
    floats = rng.standard_normal(6).astype(np.float32)
    floats[:3] = _SPECIAL[rng.permutation(len(_SPECIAL))[:3]]  # NaN, inf, -0.0, denormal...
    m = {k: jnp.float32(v) for k, v in zip(PACKED_SCALARS[:6], floats, strict=True)}
    m["finite"], m["applied"] = jnp.bool_(finite), jnp.bool_(applied)
    m["input_mean"] = jnp.asarray(rng.standard_normal(channels), jnp.float32)
    m["input_std"] = jnp.asarray(_SPECIAL[:channels], jnp.float32)
    return m


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("finite,applied", [(True, True), (True, False), (False, False)])
def test_packed_metrics_round_trip_bitwise(channels, finite, applied):
    m = _metrics(np.random.default_rng(channels), channels, finite, applied)
    got = unpack_metrics(jax.device_get(jax.jit(pack_metrics)(m)))
    assert set(got) == set(m)
    for k in PACKED_SCALARS[:6] + ("input_mean", "input_std"):
        want = np.asarray(m[k], np.float32)
        assert got[k].dtype == np.float32 and got[k].shape == want.shape, k
        assert got[k].tobytes() == want.tobytes(), k  # NaN, -0.0 and denormals included
    assert got["finite"] is finite and got["applied"] is applied


def test_with_packed_metrics_wraps_a_step():
    def step(state, batch, aug_root, dropout_root):
        x = batch["x"] * state
        m = {k: jnp.sum(x) * i for i, k in enumerate(PACKED_SCALARS[:6])}
        m["finite"], m["applied"] = jnp.isfinite(jnp.sum(x)), jnp.all(x > 0)
        m["input_mean"], m["input_std"] = jnp.mean(x, 0), jnp.std(x, 0)
        return state + 1, m

    state, batch = jnp.float32(2.0), {"x": jnp.arange(12, dtype=jnp.float32).reshape(4, 3)}
    s1, m1 = jax.jit(step)(state, batch, None, None)
    s2, packed = jax.jit(with_packed_metrics(step))(state, batch, None, None)
    assert packed.shape == (len(PACKED_SCALARS) + 6,) and packed.dtype == jnp.float32
    assert float(s1) == float(s2) == 3.0
    got, want = unpack_metrics(np.asarray(packed)), jax.device_get(m1)
    assert set(got) == set(want)
    for k, v in want.items():
        if k in ("finite", "applied"):
            assert got[k] is bool(v), k
        else:
            assert got[k].tobytes() == np.asarray(v, np.float32).tobytes(), k
    assert got["finite"] is True and got["applied"] is False  # x holds a 0
