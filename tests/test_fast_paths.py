"""The CPU fast paths give the same results: matmul convs with live taps and a hand-written
backward, and ``models.init_variables`` (bit for bit ``module.init``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import models, rng
from jaxrepro.models import conv as conv_lib
from jaxrepro.models import layers


def _fwd_bwd(impl, x, w, stride, pad, dy):
    def f(x, w):
        return layers.conv(x, w, stride, pad, impl)

    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


@pytest.mark.parametrize(
    "hw,cin,cout,k,stride,pad,live",
    [
        (1, 8, 4, 3, 1, 1, 1),  # a 3x3 conv over a 1x1 map: only the centre tap is live
        (2, 8, 4, 3, 2, 1, 4),  # 2x2 -> 1x1 with stride 2: the 2x2 lower-right taps
        (2, 4, 6, 3, 1, 1, 9),  # every tap touches some real input
        (3, 3, 4, 7, 2, 3, 25),  # 7x7/2 over 3x3: 5x5 taps reach the map
        (4, 6, 16, 1, 2, 0, 1),  # strided 1x1 (the downsample); narrow input
        (4, 16, 6, 1, 1, 0, 1),  # 1x1 with the output narrower than the input
    ],
)
def test_matmul_conv_live_taps_values_and_grads(hw, cin, cout, k, stride, pad, live):
    r = np.random.default_rng(hw * 100 + k)
    x = jnp.asarray(r.standard_normal((3, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(r.standard_normal((k, k, cin, cout)), jnp.float32)
    assert len(conv_lib._geometry(x.shape, w.shape, stride, pad)[2]) == live
    dy = jnp.asarray(r.standard_normal(layers.conv_lax(x, w, stride, pad).shape), jnp.float32)
    want = jax.jit(_fwd_bwd, static_argnums=(0, 3, 4))("lax", x, w, stride, pad, dy)
    got = jax.jit(_fwd_bwd, static_argnums=(0, 3, 4))("matmul", x, w, stride, pad, dy)
    for name, a, b in zip(("y", "dx", "dw"), want, got, strict=True):
        assert a.shape == b.shape, name
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-6 * scale, err_msg=name)
    if live < k * k:  # taps that only see padding get an exactly zero gradient
        dead = np.ones((k, k), bool)
        for di, dj in conv_lib._geometry(x.shape, w.shape, stride, pad)[2]:
            dead[di, dj] = False
        assert np.all(np.asarray(got[2])[dead] == 0.0)


def test_matmul_conv_rejects_an_empty_output():
    with pytest.raises(ValueError, match="no output"):
        conv_lib.conv_matmul(jnp.zeros((1, 2, 2, 1)), jnp.zeros((5, 5, 1, 1)), 1, 0)


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_init_variables_is_bitwise_module_init():
    # imagenet stem at 32x32: the 7x7 stem, downsampling blocks, a 1x1 last stage
    model, hw = models.build("resnet_tiny", 7, stem="imagenet", conv_impl="matmul"), 32
    key = rng.factor_root("init", 11)
    params, stats = models.init_variables(model, key, hw)
    x = jnp.zeros((1, hw, hw, 3), jnp.float32)
    want = jax.jit(lambda k: model.init({"params": k}, x, train=False))(key)
    got = {"params": params, "batch_stats": stats}
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    differ = [
        jax.tree_util.keystr(p)
        for (p, a), (_, b) in zip(want_leaves, got_leaves, strict=True)
        if not _bits_equal(a, b)
    ]
    assert not differ
    # another seed draws other values; the same seed again, the same ones
    other, _ = models.init_variables(model, rng.factor_root("init", 12), hw)
    again, _ = models.init_variables(model, key, hw)
    k = params["conv1"]["kernel"]
    assert not np.array_equal(other["conv1"]["kernel"], k)
    assert _bits_equal(again["conv1"]["kernel"], k)
    assert _bits_equal(again["fc"]["bias"], params["fc"]["bias"])


def test_init_variables_under_a_trace_gives_shapes():
    model = models.build("resnet_tiny", 3, stem="cifar")
    shapes = jax.eval_shape(
        lambda k: models.init_variables(model, k, 8), rng.factor_root("init", 0)
    )
    params, stats = shapes
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 8)
    assert stats["bn1"]["var"].shape == (8,)
