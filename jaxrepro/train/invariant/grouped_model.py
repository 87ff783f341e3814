"""The ResNet forward (train mode) over a list of groups, on jaxrepro.models' own parameters.

``grouped_apply`` computes what ``ResNet.apply(..., train=True, mutable=['batch_stats'])``
computes on the concatenated batch, with the same parameter tree (names and shapes
unchanged: checkpoints, the torch port and evaluation use the plain module), but:

* the batch is a Python list of groups, and each group runs the identical one-group
  program (no ``vmap``: it would turn the convolutions into grouped ones and change the
  bits; no ``lax.map``/stacking: it compiles differently when a device holds one group);
* each group reads its *own copy* of the parameters (``copies[g]``), so autodiff gives
  one gradient per group instead of summing the groups in an order of XLA's choosing;
* BatchNorm is ``grouped_bn.grouped_batch_norm``: global-batch statistics combined in a
  fixed order, identical on every layout.

The layer arithmetic (casts, explicit padding, conv implementation, float32 statistics,
float32 pooling) follows ``jaxrepro.models`` line by line, so the result matches the
plain module within float32 summation-order differences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrepro.models.batchnorm import BatchNorm
from jaxrepro.models.layers import conv as conv_op
from jaxrepro.models.pooling import max_pool
from jaxrepro.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxrepro.plumbing.hashing import path_str
from jaxrepro.train.invariant import grouped_bn

_MOMENTUM = BatchNorm.momentum
_EPS = BatchNorm.epsilon


class _Grouped:
    """One traced forward: the per-group parameter copies, and the statistics it updates."""

    def __init__(self, module: ResNet, copies: list, batch_stats, groups: int, axis_name):
        self.m = module
        self.copies = copies
        self.batch_stats = batch_stats
        self.groups = groups
        self.axis_name = axis_name
        self.updated = {}  # "path/mean" -> new running value

    def params(self, path: tuple[str, ...], name: str) -> list[jax.Array]:
        out = []
        for copy in self.copies:
            node = copy
            for key in (*path, name):
                node = node[key]
            out.append(node)
        return out

    def conv(self, xs, path, stride: int, padding: int):
        dt = self.m.dtype
        kernels = self.params(path, "kernel")
        return [
            conv_op(x.astype(dt), k.astype(dt), stride, padding, self.m.conv_impl)
            for x, k in zip(xs, kernels, strict=True)
        ]

    def bn(self, xs, path):
        xs32 = [x.astype(jnp.float32) for x in xs]
        scales, biases = self.params(path, "scale"), self.params(path, "bias")
        ys, mean, var = grouped_bn.grouped_batch_norm(xs32, scales, biases, _EPS, self.axis_name)
        n = xs32[0].shape[0] * xs32[0].shape[1] * xs32[0].shape[2] * self.groups
        node = self.batch_stats
        for key in path:
            node = node[key]
        new_mean, new_var = grouped_bn.running_update(
            node["mean"], node["var"], mean, var, n, _MOMENTUM
        )
        prefix = "/".join(path)
        self.updated[f"{prefix}/mean"] = new_mean
        self.updated[f"{prefix}/var"] = new_var
        return [y.astype(self.m.dtype) for y in ys]

    def new_batch_stats(self):
        """The running statistics, in the input tree's own structure."""

        def pick(path, old):
            key = path_str(path)
            if key not in self.updated:
                raise ValueError(f"batch_stats entry {key!r} belongs to no BatchNorm of the model")
            return self.updated[key]

        return jax.tree_util.tree_map_with_path(pick, self.batch_stats)


def _relu(xs):
    return [jax.nn.relu(x) for x in xs]


def _add_relu(xs, shortcuts):
    return [jax.nn.relu(x + s) for x, s in zip(xs, shortcuts, strict=True)]


def _shortcut(net: _Grouped, xs, path, stride: int, out_planes: int):
    if stride == 1 and xs[0].shape[-1] == out_planes:
        return xs
    out = net.conv(xs, (*path, "downsample_conv"), stride, 0)
    return net.bn(out, (*path, "downsample_bn"))


def _basic(net: _Grouped, xs, path, planes: int, stride: int):
    out = net.conv(xs, (*path, "conv1"), stride, 1)
    out = _relu(net.bn(out, (*path, "bn1")))
    out = net.conv(out, (*path, "conv2"), 1, 1)
    out = net.bn(out, (*path, "bn2"))
    return _add_relu(out, _shortcut(net, xs, path, stride, planes))


def _bottleneck(net: _Grouped, xs, path, planes: int, stride: int):
    out_planes = planes * Bottleneck.expansion
    out = net.conv(xs, (*path, "conv1"), 1, 0)
    out = _relu(net.bn(out, (*path, "bn1")))
    out = net.conv(out, (*path, "conv2"), stride, 1)
    out = _relu(net.bn(out, (*path, "bn2")))
    out = net.conv(out, (*path, "conv3"), 1, 0)
    out = net.bn(out, (*path, "bn3"))
    return _add_relu(out, _shortcut(net, xs, path, stride, out_planes))


def _stem(net: _Grouped, xs):
    m = net.m
    if m.stem == "imagenet":
        xs = net.conv(xs, ("conv1",), 2, 3)
    else:
        xs = net.conv(xs, ("conv1",), 1, 1)
    xs = _relu(net.bn(xs, ("bn1",)))
    if m.stem == "imagenet":
        xs = [max_pool(x, m.maxpool_impl, window=3, stride=2, padding=1) for x in xs]
    return xs


def _head(net: _Grouped, xs):
    dt = net.m.dtype
    kernels, biases = net.params(("fc",), "kernel"), net.params(("fc",), "bias")
    logits = []
    for x, k, b in zip(xs, kernels, biases, strict=True):
        # Global average pool accumulated in float32, per example (as the plain module).
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = jnp.dot(features.astype(dt), k.astype(dt)) + b.astype(dt)
        logits.append(out.astype(jnp.float32))
    return logits


def check_module(module) -> ResNet:
    """The module if ``grouped_apply`` can run it, else a ValueError naming why."""
    if not isinstance(module, ResNet):
        raise ValueError(f"device-invariant mode supports jaxrepro.models ResNets, got {module!r}")
    if module.block_cls not in (BasicBlock, Bottleneck):
        raise ValueError(f"unsupported ResNet block {module.block_cls!r}")
    if module.stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {module.stem!r}")
    if module.dropout_rate > 0:
        # A grouped forward without it would train another model than the plain step.
        raise ValueError(
            f"device-invariant mode has no dropout; the module has dropout_rate="
            f"{module.dropout_rate} (use dropout_rate=0, or the plain step)"
        )
    return module


def grouped_apply(module, copies: list, batch_stats, xs: list, *, groups: int, axis_name=None):
    """Train-mode forward of ``module`` over this device's groups.

    Args:
      module: a ``jaxrepro.models`` ResNet (its attributes choose the architecture).
      copies: one parameter tree per local group (``module``'s tree; equal values).
      batch_stats: the running statistics (one tree, replicated).
      xs: the local groups, normalised float32 NHWC, one array per group, equal shapes.
      groups: G, the number of groups over all devices.
      axis_name: the mesh axis holding the other groups (None: all G are in ``xs``).

    Returns:
      (logits, batch_stats): per-group float32 logits, and the updated running
      statistics (global-batch statistics, the same bits on every layout).
    """
    m = check_module(module)
    if len(copies) != len(xs) or not xs:
        raise ValueError(f"need one parameter copy per group, got {len(copies)} for {len(xs)}")
    if len({x.shape for x in xs}) != 1:
        raise ValueError(f"all groups must have one shape, got {sorted({x.shape for x in xs})}")
    net = _Grouped(m, copies, batch_stats, groups, axis_name)
    block = _basic if m.block_cls is BasicBlock else _bottleneck
    h = _stem(net, xs)
    for i, blocks in enumerate(m.stage_sizes):
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            h = block(net, h, (f"layer{i + 1}_{j}",), m.width * 2**i, stride)
    return _head(net, h), net.new_batch_stats()
