"""The ResNet family: layout, parameter counts, inits, and the equivalence of impls."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import models, rng
from jaxrepro.models import fusion, layers, pooling
from jaxrepro.models.batchnorm import _bn_fused, batch_norm_train_plain

# torchvision's parameter counts (1000 classes).
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def _key(i=0):
    return rng.factor_root("init", i)


@functools.lru_cache(maxsize=32)
def _shapes(model, image_hw=32):
    """Variable shapes by tracing init (no compile, no random draws)."""
    x = jnp.zeros((1, image_hw, image_hw, 3))
    return jax.eval_shape(lambda k: model.init(k, x), _key())


def _fill(model, seed=0, image_hw=32):
    """Variables of the right tree filled from numpy: no init compile, non-trivial BN."""
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel" and len(s.shape) == 4:  # He-scaled, so activations stay O(1)
            v = r.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:3]))
        elif name == "kernel":
            v = r.uniform(-1, 1, s.shape) / np.sqrt(s.shape[0])
        elif name in ("scale", "var"):
            v = r.uniform(0.5, 1.5, s.shape)
        else:  # BN bias, running mean, fc bias
            v = r.normal(0.0, 0.1, s.shape)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, _shapes(model, image_hw))


def _images(n=4, hw=32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, hw, hw, 3)), jnp.float32)


def _bits(a):
    return np.asarray(a).view(np.uint32)


def _loss_and_grads(model, variables, x):
    """Train-mode loss, parameter grads and updated stats, all jitted."""

    def loss(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x, train=True, mutable=["batch_stats"],
        )  # fmt: skip
        return jnp.sum(jnp.sin(logits)), (logits, upd["batch_stats"])

    (val, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"]
    )
    return logits, grads, stats


def _assert_trees_close(a, b, rel):
    """Each leaf within ``rel`` of the leaf's own scale (grads of sums cancel: an
    element-wise relative test would judge the rounding of near-zero entries)."""
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        scale = max(float(np.abs(y).max()), 1e-30)
        np.testing.assert_allclose(x, y, rtol=0, atol=rel * scale, err_msg=str(path))


# ---------------------------------------------------------------- layout and counts


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_param_counts_match_torchvision(name):
    shapes = _shapes(models.build(name, 1000))
    assert models.count_params(shapes["params"]) == TORCHVISION_COUNTS[name]


@pytest.mark.parametrize("stem,hw,final_hw", [("imagenet", 64, 2), ("cifar", 32, 4)])
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_output_shapes_every_variant_and_stem(name, stem, hw, final_hw):
    model = models.build(name, 1000, stem=stem)
    x = jnp.zeros((3, hw, hw, 3))
    logits, inter = jax.eval_shape(
        lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        _shapes(model),
    )
    assert logits.shape == (3, 1000)
    # the stem decides the resolution: imagenet /32 overall, cifar /8
    last = inter["intermediates"]["layer4_0"]["__call__"][0]
    assert last.shape == (3, final_hw, final_hw, models.feature_dim(name))


def test_parameter_tree_names_and_layouts():
    variables = _shapes(models.build("resnet50", 10))
    params, stats = variables["params"], variables["batch_stats"]
    blocks = [f"layer{i + 1}_{j}" for i, n in enumerate((3, 4, 6, 3)) for j in range(n)]
    assert set(params) == {"conv1", "bn1", "fc", *blocks}
    assert set(stats) == {"bn1", *blocks}
    assert set(params["layer1_0"]) == {
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"
    }  # fmt: skip
    assert "downsample_conv" not in params["layer1_1"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    # v1.5: the stride-2 block's 3x3 conv is conv2, its 1x1s are conv1 / conv3 (HWIO)
    assert params["layer2_0"]["conv1"]["kernel"].shape == (1, 1, 256, 128)
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
    assert set(params["layer2_0"]["bn3"]) == {"scale", "bias"}
    assert set(stats["layer2_0"]["downsample_bn"]) == {"mean", "var"}
    assert params["fc"]["kernel"].shape == (2048, 10)
    assert params["fc"]["bias"].shape == (10,)
    basic = _shapes(models.build("resnet18", 10))["params"]
    assert set(basic["layer2_0"]) == {
        "conv1", "bn1", "conv2", "bn2", "downsample_conv", "downsample_bn"
    }  # fmt: skip
    assert set(basic["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}


def test_v1_5_stride_sits_on_the_bottleneck_3x3():
    model = models.build("resnet50", 10, stem="cifar")
    x = jnp.zeros((2, 16, 16, 3))
    _, inter = jax.eval_shape(
        lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        _shapes(model),
    )
    block = inter["intermediates"]["layer2_0"]
    assert block["conv1"]["__call__"][0].shape == (2, 16, 16, 128)  # 1x1, stride 1
    assert block["conv2"]["__call__"][0].shape == (2, 8, 8, 128)  # 3x3, stride 2
    assert block["downsample_conv"]["__call__"][0].shape == (2, 8, 8, 512)


def test_padding_and_pooling_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r = np.random.default_rng(5)
    x = r.standard_normal((2, 9, 10, 3)).astype(np.float32)  # odd and even sizes
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def to_nhwc(t):
        return t.detach().numpy().transpose(0, 2, 3, 1)

    for k, stride, pad in [(7, 2, 3), (3, 2, 1), (3, 1, 1), (1, 2, 0)]:
        w = r.standard_normal((k, k, 3, 4)).astype(np.float32)
        want = F.conv2d(xt, torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), None, stride, pad)
        for impl in layers.CONV_IMPLS:
            got = layers.conv(jnp.asarray(x), jnp.asarray(w), stride, pad, impl)
            np.testing.assert_allclose(got, to_nhwc(want), rtol=1e-5, atol=1e-5)
    want = to_nhwc(F.max_pool2d(xt, 3, 2, 1))
    for impl in pooling.MAXPOOL_IMPLS:
        np.testing.assert_array_equal(pooling.max_pool(jnp.asarray(x), impl), want)


def test_feature_dim():
    assert models.feature_dim("resnet18") == 512
    assert models.feature_dim("resnet50") == 2048
    assert models.feature_dim("resnet_tiny") == 64
    assert models.feature_dim("resnet50", width=16) == 512
    assert models.build("resnet_tiny", 3).width == 8
    assert models.build("resnet_tiny", 3, width=4).width == 4
    model = models.build("resnet50", 10)
    x = jnp.zeros((2, 32, 32, 3))
    feats = jax.eval_shape(lambda v: model.apply(v, x, method="features"), _shapes(model))
    assert feats.shape == (2, 2048) and feats.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="resnet51"), "resnet50"),
        (dict(stem="mnist"), "cifar"),
        (dict(conv_impl="fft"), "matmul"),
        (dict(maxpool_impl="fast"), "deterministic"),
        (dict(bn_impl="apex"), "fused"),
        (dict(dtype="float64"), "bfloat16"),
        (dict(num_classes=0), "num_classes"),
        (dict(width=0), "width"),
    ],
)
def test_build_rejects_bad_choices(kwargs, match):
    args = dict(name="resnet18", num_classes=10) | kwargs
    name, num_classes = args.pop("name"), args.pop("num_classes")
    with pytest.raises(ValueError, match=match):
        models.build(name, num_classes, **args)


def test_helpers_reject_unknown_names_and_impls():
    with pytest.raises(ValueError, match="resnet_tiny"):
        models.feature_dim("vgg16")
    with pytest.raises(ValueError, match="lax, matmul"):
        layers.conv(jnp.zeros((1, 3, 3, 1)), jnp.zeros((1, 1, 1, 1)), 1, 0, "winograd")
    with pytest.raises(ValueError, match="lax, deterministic"):
        pooling.max_pool(jnp.zeros((1, 4, 4, 1)), "cudnn")


# ---------------------------------------------------------------- inits


def test_conv_init_is_kaiming_normal_fan_out():
    kernel = layers.Conv(64, 3).init(_key(), jnp.zeros((1, 4, 4, 64)))["params"]["kernel"]
    w = np.asarray(kernel)  # 3x3x64x64: 36,864 draws
    assert w.shape == (3, 3, 64, 64) and w.dtype == np.float32
    std = np.sqrt(2.0 / (3 * 3 * 64))  # fan_out = out_channels * kh * kw
    assert abs(w.std() / std - 1) < 0.03
    assert abs(w.mean()) < 4 * std / np.sqrt(w.size)
    assert (np.abs(w) > 2 * std).mean() > 0.035  # normal, not truncated (4.6 % expected)


@pytest.mark.parametrize(
    "block_cls,stride,last_bn", [(models.BasicBlock, 1, "bn2"), (models.Bottleneck, 2, "bn3")]
)
@pytest.mark.parametrize("zero_init", [False, True])
def test_block_bn_init_and_zero_init_residual(block_cls, stride, last_bn, zero_init):
    block = block_cls(planes=4, stride=stride, zero_init_residual=zero_init)
    in_ch = 4 * block_cls.expansion
    variables = block.init(_key(), jnp.zeros((2, 4, 4, in_ch)), train=False)
    params = variables["params"]
    assert ("downsample_bn" in params) == (stride == 2)
    bns = [name for name in params if "bn" in name]
    assert last_bn in bns
    for name in bns:
        want = 0.0 if (zero_init and name == last_bn) else 1.0
        np.testing.assert_array_equal(params[name]["scale"], want, err_msg=name)
        np.testing.assert_array_equal(params[name]["bias"], 0.0)
        np.testing.assert_array_equal(variables["batch_stats"][name]["mean"], 0.0)
        np.testing.assert_array_equal(variables["batch_stats"][name]["var"], 1.0)
    model = models.build("resnet50", 10, zero_init_residual=zero_init)
    assert model.zero_init_residual is zero_init


def test_init_head_draws_like_the_fc():
    head = models.init_head(rng.factor_root("head", 3), 64, 5)
    same = models.Head(5).init(rng.factor_root("head", 3), jnp.zeros((1, 64)))["params"]
    assert set(head) == {"kernel", "bias"}
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(head[k], same[k])
    assert head["kernel"].shape == (64, 5) and head["bias"].shape == (5,)
    assert head["kernel"].dtype == jnp.float32
    # torch.nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) for kernel and bias alike
    for leaf in (head["kernel"], head["bias"]):
        assert 0.5 / 8 < np.abs(leaf).max() <= 1 / 8
    other = models.init_head(rng.factor_root("head", 4), 64, 5)
    assert not np.array_equal(other["kernel"], head["kernel"])
    assert models.init_head(_key(), 64, 5, jnp.bfloat16)["bias"].dtype == jnp.bfloat16
    # graft it onto a backbone: the engine's fine-tune head swap
    model = models.build("resnet_tiny", 10)
    variables, x = _fill(model), _images(2)
    params = dict(variables["params"], fc=head)
    logits = models.build("resnet_tiny", 5).apply(dict(variables, params=params), x)
    feats = model.apply(variables, x, method=model.features)
    np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- forward, train/eval


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18"])
def test_real_forward_train_and_eval(name):
    model = models.build(name, 10, stem="cifar" if name == "resnet18" else "imagenet")
    variables = _fill(model)
    x = _images(4, 16 if name == "resnet18" else 32)
    eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    train_logits, upd = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
    assert eval_logits.shape == train_logits.shape == (4, 10)
    assert eval_logits.dtype == jnp.float32
    assert np.isfinite(eval_logits).all() and np.isfinite(train_logits).all()
    assert not np.allclose(eval_logits, train_logits)  # batch vs running statistics
    # Every running statistic moved, towards the batch statistic by 10 %.
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(upd["batch_stats"])
    assert len(old) == len(new) and all(
        not np.allclose(a, b) for a, b in zip(old, new, strict=True)
    )
    # The model is a pure function: the same call gives the same bits.
    again = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    np.testing.assert_array_equal(_bits(again), _bits(eval_logits))


def test_features_method_and_flag_agree():
    model = models.build("resnet_tiny", 10)
    variables, x = _fill(model), _images(2)
    a = model.apply(variables, x, method="features")
    b = model.apply(variables, x, return_features=True)
    np.testing.assert_array_equal(a, b)
    logits = model.apply(variables, x)
    fc = variables["params"]["fc"]
    np.testing.assert_allclose(logits, a @ fc["kernel"] + fc["bias"], rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.build("resnet_tiny", 10, dtype="bfloat16")
    variables, x = _fill(model), _images(2)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    _, inter = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    assert inter["intermediates"]["layer2_0"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
    low = model.apply(variables, x)
    high = models.build("resnet_tiny", 10).apply(variables, x)
    assert low.dtype == jnp.float32
    assert not np.array_equal(low, high)
    np.testing.assert_allclose(low, high, rtol=0.1, atol=0.1)


# ---------------------------------------------------------------- BatchNorm


def test_batchnorm_matches_torch_conventions():
    x = _images(3, 5) * 2.0 + 0.5  # n = 75 values per channel
    bn = models.BatchNorm()
    variables = bn.init(_key(), x, train=False)
    stats = {"mean": jnp.array([0.2, -0.1, 0.3]), "var": jnp.array([1.5, 0.7, 2.0])}
    params = {"scale": jnp.array([1.2, 0.8, 1.0]), "bias": jnp.array([0.1, 0.0, -0.2])}
    y, upd = bn.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=True)
    xn = np.asarray(x, np.float64)
    mean, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))  # biased, to normalise
    want = (xn - mean) / np.sqrt(var + 1e-5) * np.asarray(params["scale"]) + params["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    unbiased = xn.var((0, 1, 2), ddof=1)  # torch's running_var takes the unbiased one
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * stats["mean"] + 0.1 * mean, 1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 * stats["var"] + 0.1 * unbiased, 1e-6)
    y_eval = bn.apply({"params": params, "batch_stats": stats}, x, train=False)
    want_eval = (xn - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
    np.testing.assert_allclose(y_eval, want_eval * params["scale"] + params["bias"], 1e-5, 1e-5)
    assert set(variables["params"]) == {"scale", "bias"}


def test_batchnorm_refuses_one_value_per_channel():
    bn = models.BatchNorm()
    x = jnp.ones((1, 1, 1, 4))
    variables = bn.init(_key(), x, train=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])


def test_fused_batchnorm_vjp_matches_autodiff():
    r = np.random.default_rng(2)
    x = jnp.asarray(r.normal(1.0, 2.0, (4, 3, 5, 6)), jnp.float32)
    scale = jnp.asarray(r.uniform(0.5, 1.5, 6), jnp.float32)
    bias = jnp.asarray(r.normal(0, 1, 6), jnp.float32)
    cots = (
        jnp.asarray(r.normal(0, 1, x.shape), jnp.float32),
        jnp.asarray(r.normal(0, 1, 6), jnp.float32),  # on the mean output
        jnp.asarray(r.normal(0, 1, 6), jnp.float32),  # on the variance output
    )
    out_p, vjp_p = jax.vjp(lambda *a: batch_norm_train_plain(*a, 1e-5), x, scale, bias)
    out_f, vjp_f = jax.vjp(lambda *a: _bn_fused(*a, 1e-5), x, scale, bias)
    for a, b in zip(out_p, out_f, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(vjp_p(cots), vjp_f(cots), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------- conv impls


@pytest.mark.parametrize(
    "k,stride,pad,hw", [(1, 1, 0, 5), (1, 2, 0, 7), (3, 1, 1, 6), (3, 2, 1, 7), (7, 2, 3, 9)]
)
def test_matmul_conv_equals_lax_conv(k, stride, pad, hw):
    r = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(r.standard_normal((2, hw, hw, 3)), jnp.float32)
    w = jnp.asarray(r.standard_normal((k, k, 3, 5)), jnp.float32)
    dy_shape = layers.conv_lax(x, w, stride, pad).shape
    dy = jnp.asarray(r.standard_normal(dy_shape), jnp.float32)
    outs = {}
    for impl in layers.CONV_IMPLS:

        def fwd_bwd(x, w, dy, impl=impl):
            y, vjp = jax.vjp(lambda x, w: layers.conv(x, w, stride, pad, impl), x, w)
            return (y, *vjp(dy))

        outs[impl] = jax.jit(fwd_bwd)(x, w, dy)
    for a, b in zip(outs["lax"], outs["matmul"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_reference():
    """Train-mode logits, grads and stats of a filled tiny model with the default impls.

    64x64 input, so the last stage still has 2x2 maps (train-mode BN over 4 values per
    channel makes gradients ill-conditioned and swamps the comparison in rounding).
    """
    model = models.build("resnet_tiny", 10)
    variables, x = _fill(model, image_hw=64), _images(4, 64)
    return variables, x, _loss_and_grads(model, variables, x)


def test_model_matmul_conv_and_fused_bn_match_the_plain_model(tiny_reference):
    variables, x, (logits, grads, stats) = tiny_reference
    model = models.build("resnet_tiny", 10, conv_impl="matmul", bn_impl="fused")
    out_logits, out_grads, out_stats = _loss_and_grads(model, variables, x)
    assert jax.tree_util.tree_structure(out_grads) == jax.tree_util.tree_structure(grads)
    np.testing.assert_allclose(out_logits, logits, rtol=0, atol=1e-5)
    _assert_trees_close(out_grads, grads, rel=3e-5)
    _assert_trees_close(out_stats, stats, rel=1e-5)


def test_bottleneck_model_matmul_conv_and_fused_bn_match():
    def make(conv_impl, bn_impl):
        return models.ResNet(
            (1, 1, 1, 1), models.Bottleneck, 6, width=4, conv_impl=conv_impl, bn_impl=bn_impl
        )

    variables, x = _fill(make("lax", "flax"), image_hw=64), _images(4, 64)
    ref = _loss_and_grads(make("lax", "flax"), variables, x)
    out = _loss_and_grads(make("matmul", "fused"), variables, x)
    np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=1e-5)
    _assert_trees_close(out[1], ref[1], rel=3e-5)


# ---------------------------------------------------------------- max-pool


def _pool_vjp(fn, x, dy):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(dy)[0]


_pool_vjp_jit = jax.jit(_pool_vjp, static_argnums=0)

POOL_INPUTS = {
    "normal": lambda r, s: r.standard_normal(s),
    "integers (many ties)": lambda r, s: r.integers(-2, 3, s),
    "relu zeros": lambda r, s: np.maximum(r.standard_normal(s), 0.0),
    "all equal": lambda r, s: np.zeros(s),
    "infinities": lambda r, s: np.where(r.random(s) < 0.3, -np.inf, r.integers(0, 2, s)),
}


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
@pytest.mark.parametrize("kind", sorted(POOL_INPUTS))
def test_deterministic_maxpool_is_bitwise_lax(kind, shape):
    r = np.random.default_rng(len(kind))
    x = jnp.asarray(POOL_INPUTS[kind](r, shape), jnp.float32)
    out_shape = pooling.max_pool_lax(x).shape
    # cotangents of mixed magnitudes, so a different summation order would show
    dy = r.standard_normal(out_shape) * 10.0 ** r.integers(-6, 6, out_shape)
    dy = jnp.asarray(dy, jnp.float32)
    for run in (_pool_vjp, _pool_vjp_jit):
        y_lax, g_lax = run(pooling.max_pool_lax, x, dy)
        y_det, g_det = run(pooling.max_pool_deterministic, x, dy)
        np.testing.assert_array_equal(_bits(y_det), _bits(y_lax))
        np.testing.assert_array_equal(_bits(g_det), _bits(g_lax))


def test_maxpool_gradient_tie_break_and_summation_order():
    # One 4x4 map whose only non-zero cell is in all four 3x3/2 windows.
    x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(5.0)
    dy = jnp.array([1.0, 1e-8, 3e-8, -1.0], jnp.float32).reshape(1, 2, 2, 1)
    _, g = _pool_vjp(pooling.max_pool_deterministic, x, dy)
    # XLA adds in row-major output order: ((1 + 1e-8) + 3e-8) - 1 == 0 in float32,
    # where the reverse order would give 5.96e-8.
    assert float(g[0, 1, 1, 0]) == float(_pool_vjp(pooling.max_pool_lax, x, dy)[1][0, 1, 1, 0])
    assert float(g[0, 1, 1, 0]) == 0.0
    # All-zero input: each window's first real cell (row-major) takes the gradient.
    _, g = _pool_vjp(
        pooling.max_pool_deterministic, jnp.zeros((1, 4, 4, 1)), jnp.ones((1, 2, 2, 1))
    )
    np.testing.assert_array_equal(g[0, :, :, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0] * 4, [0] * 4])


def test_deterministic_maxpool_gradient_has_no_scatter():
    x, dy = jnp.ones((2, 8, 8, 3)), jnp.ones((2, 4, 4, 3))

    def hlo(fn):
        return _pool_vjp_jit.lower(fn, x, dy).as_text().lower()

    assert "select_and_scatter" in hlo(pooling.max_pool_lax)  # what the GPU flag refuses
    assert "scatter" not in hlo(pooling.max_pool_deterministic)


def test_deterministic_maxpool_backward_computes_the_selection_once():
    # The window selection is stored (an s8 buffer in the compiled program), not fused
    # into the scatter, where XLA would recompute it for each of the nine offsets.
    x, dy = jnp.ones((2, 16, 16, 8)), jnp.ones((2, 8, 8, 8))
    hlo = _pool_vjp_jit.lower(pooling.max_pool_deterministic, x, dy).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    assert re.search(r"= s8\[2,8,8,8\]\S* fusion\(", entry), entry


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
def test_stored_is_the_identity_and_xla_keeps_it(dtype):
    if dtype == jnp.float32:
        values = [np.nan, -0.0, 0.0, -np.inf, np.inf, 1e-45, -3.5, 7.25]
    else:
        values = [-128, -1, 0, 1, 127, 5, -7, 3]
    a = jnp.asarray(np.array(values * 4).reshape(4, 8), dtype)
    fn = jax.jit(fusion.stored)
    np.testing.assert_array_equal(_bits(fn(a)), _bits(a))
    # XLA keeps the loop that makes it a stored buffer (it removes optimization barriers)
    assert " while(" in fn.lower(a).compile().as_text()
    if dtype == jnp.float32:
        x = jnp.arange(6.0).reshape(2, 3)
        g = jax.grad(lambda x: jnp.sum(fusion.stored(x * x) * 3.0))(x)
        np.testing.assert_array_equal(g, 6.0 * x)


def test_model_deterministic_maxpool_is_bitwise_lax(tiny_reference):
    variables, x, (logits, grads, _) = tiny_reference
    model = models.build("resnet_tiny", 10, maxpool_impl="deterministic")
    out_logits, out_grads, _ = _loss_and_grads(model, variables, x)
    np.testing.assert_array_equal(_bits(out_logits), _bits(logits))
    for a, b in zip(*map(jax.tree_util.tree_leaves, (out_grads, grads)), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))
