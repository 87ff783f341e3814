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


def _jit_fwd_bwd():
    return jax.jit(lambda *a: _fwd_bwd(*a), static_argnums=(0, 3, 4))


@pytest.mark.parametrize(
    "n,hw,cin,cout,k,stride,pad",
    [
        (2, 8, 3, 5, 3, 1, 1),  # 3x3/1: slabs overlap by two rows, the fold adds the halos
        (2, 9, 4, 6, 3, 2, 1),  # 3x3/2 over an odd map
        (2, 12, 3, 4, 7, 2, 3),  # the 7x7/2 stem
        (1, 2, 4, 3, 3, 1, 1),  # a 2x2 map: two blocks of one row
        (3, 3, 4, 6, 5, 2, 2),  # dead taps (5x5/2 over 3x3): left out in every block
    ],
)
def test_row_blocked_matmul_conv_values_and_grads(monkeypatch, n, hw, cin, cout, k, stride, pad):
    """Forcing blocks of one output row (thresholds of 1 byte): the same convolution."""
    r = np.random.default_rng(hw * 10 + k)
    x = jnp.asarray(r.standard_normal((n, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(r.standard_normal((k, k, cin, cout)), jnp.float32)
    out_h, out_w, taps = conv_lib._geometry(x.shape, w.shape, stride, pad)
    dy = jnp.asarray(r.standard_normal((n, out_h, out_w, cout)), jnp.float32)
    want = _jit_fwd_bwd()("lax", x, w, stride, pad, dy)
    whole = _jit_fwd_bwd()("matmul", x, w, stride, pad, dy)
    monkeypatch.setattr(conv_lib, "BLOCK_ABOVE", 1)
    monkeypatch.setattr(conv_lib, "BLOCK_BYTES", 1)
    assert conv_lib._rows_per_block(x.shape, out_h, out_w, len(taps), 4) == 1 < out_h
    f = _jit_fwd_bwd()  # a new function: jit's cache holds the whole-conv trace of the old
    blocked = f("matmul", x, w, stride, pad, dy)
    assert "while" in f.lower("matmul", x, w, stride, pad, dy).as_text()  # blocked path ran
    for name, a, b, c in zip(("y", "dx", "dw"), want, blocked, whole, strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-6 * scale, err_msg=name)
        np.testing.assert_allclose(b, c, rtol=0, atol=2e-6 * scale, err_msg=name)
    # deterministic, and under vmap (a leading group axis) the same per group
    again = f("matmul", x, w, stride, pad, dy)
    assert all(_bits_equal(a, b) for a, b in zip(blocked, again, strict=True))
    xs, dys = jnp.stack([x, -x]), jnp.stack([dy, 2 * dy])
    grouped = jax.jit(
        jax.vmap(_fwd_bwd, in_axes=(None, 0, None, None, None, 0)), static_argnums=(0, 3, 4)
    )
    got = grouped("matmul", xs, w, stride, pad, dys)
    for g in range(2):
        one = f("matmul", xs[g], w, stride, pad, dys[g])
        for name, a, b in zip(("y", "dx", "dw"), one, got, strict=True):
            scale = float(jnp.max(jnp.abs(a)))
            np.testing.assert_allclose(b[g], a, rtol=0, atol=2e-6 * scale, err_msg=f"{name}[{g}]")


def test_row_blocked_matmul_conv_in_bfloat16_sums_in_float32(monkeypatch):
    r = np.random.default_rng(7)
    x = jnp.asarray(r.standard_normal((2, 16, 16, 8)), jnp.float32)
    w = jnp.asarray(r.standard_normal((3, 3, 8, 4)), jnp.float32)
    dy = jnp.asarray(r.standard_normal((2, 16, 16, 4)), jnp.float32)
    want = _jit_fwd_bwd()("lax", x, w, 1, 1, dy)
    bf = jnp.bfloat16
    args = (x.astype(bf), w.astype(bf), 1, 1, dy.astype(bf))
    whole = _jit_fwd_bwd()("matmul", *args)
    monkeypatch.setattr(conv_lib, "BLOCK_ABOVE", 1)
    monkeypatch.setattr(conv_lib, "BLOCK_BYTES", 1)
    blocked = _jit_fwd_bwd()("matmul", *args)
    assert blocked[2].dtype == bf

    def err(got, ref):
        return float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))

    for name, a, b in zip(("y", "dx", "dw"), want, blocked, strict=True):
        assert err(b, a) < 1e-2, name
    # 16 blocks' weight gradients summed in float32 and rounded once: about as close as
    # the whole matrix's (0.0030 vs 0.0025 here); summed in bfloat16 it was 0.0050
    assert err(blocked[2], want[2]) < 1.5 * err(whole[2], want[2])


def test_row_blocks_only_for_large_patch_matrices():
    rows = conv_lib._rows_per_block
    mib = 1 << 20
    # ResNet-50 at 224x224, batch 8: the 3x3 convs on 56x56 maps (58 MiB of patches) go
    # in blocks of 4 rows (4.1 MiB); 14x14 maps (14.5 MiB) stay whole; so does every conv
    # of the 32x32 digits default (at most 4.7 MiB) and every 1x1 conv
    assert rows((8, 56, 56, 64), 56, 56, 9, 4) == 4
    assert 4 * 8 * 56 * 9 * 64 * 4 <= conv_lib.BLOCK_BYTES < 7 * 8 * 56 * 9 * 64 * 4
    assert rows((8, 14, 14, 256), 14, 14, 9, 4) == 14
    assert rows((32, 8, 8, 64), 8, 8, 9, 4) == 8
    assert rows((32, 32, 32, 3), 16, 16, 49, 4) == 16
    assert rows((8, 56, 56, 256), 56, 56, 1, 4) == 56
    # a single row over the budget still goes one row at a time
    assert rows((64, 56, 56, 64), 56, 56, 9, 4) == 1
    assert conv_lib.BLOCK_ABOVE >= 8 * mib


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
