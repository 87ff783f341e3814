"""ResNet-18/34/50/101/152 (v1.5) in Flax Linen, laid out like torchvision.

Why the details are what they are (each is needed for torchvision weights to give
torchvision's logits, within float32 rounding):

* Padding is explicit and symmetric everywhere: 3x3 convs pad 1, the 7x7 stem conv
  pads 3, the stem max-pool is 3x3/2 padded 1 with -inf. 'SAME' pads a stride-2 conv or
  pool only at the bottom/right, which moves every window by a pixel against PyTorch
  (measured: logit errors ~0.7 with 'SAME' everywhere, 0.1-0.24 with it on the pool).
* v1.5: a bottleneck's stride sits on its 3x3 conv, not on its first 1x1 (torchvision).
* BatchNorm matches torch.nn.BatchNorm2d: epsilon 1e-5, momentum 0.9 in Flax's
  convention (0.1 in PyTorch's), biased batch variance to normalise, unbiased batch
  variance into the running variance (see batchnorm.py).
* Convs carry no bias (the BatchNorm after them has one); inits follow torchvision:
  kaiming_normal(fan_out, relu) convs, BN scale 1 / bias 0 (scale 0 on each block's last
  BN with ``zero_init_residual``), ``fc`` as torch.nn.Linear's default.

Parameter tree (fixed: the torch <-> flax port is written against it): top level
``conv1``, ``bn1``, ``layer{i}_{j}`` (stage i = 1..4, block j = 0..), ``fc``; in a block
``conv1``, ``bn1``, ``conv2``, ``bn2`` (``conv3``, ``bn3`` in a bottleneck),
``downsample_conv``, ``downsample_bn``. Conv ``kernel`` is HWIO, fc ``kernel`` is
(in, out); BatchNorm has params ``scale``/``bias`` and batch_stats ``mean``/``var``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrepro.models.batchnorm import BatchNorm
from jaxrepro.models.fusion import stored
from jaxrepro.models.layers import Conv, Head
from jaxrepro.models.pooling import max_pool

STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the stride sits on the first."""

    planes: int
    stride: int = 1
    zero_init_residual: bool = False
    conv_impl: str = "lax"
    bn_impl: str = "flax"
    dtype: jnp.dtype = jnp.float32
    contract_chunk: int = 0

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = dict(impl=self.conv_impl, dtype=self.dtype, chunk=self.contract_chunk)
        bn = dict(impl=self.bn_impl, dtype=self.dtype)
        out = Conv(self.planes, 3, self.stride, 1, name="conv1", **conv)(x)
        out = nn.relu(BatchNorm(name="bn1", **bn)(out, train))
        out = Conv(self.planes, 3, 1, 1, name="conv2", **conv)(out)
        out = BatchNorm(zero_scale=self.zero_init_residual, name="bn2", **bn)(out, train)
        # Stored: else XLA recomputes it inside the next block's residual add (fusion.py).
        return stored(nn.relu(out + _shortcut(self, x, self.planes, train)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4 (ResNet-50+)."""

    planes: int
    stride: int = 1
    zero_init_residual: bool = False
    conv_impl: str = "lax"
    bn_impl: str = "flax"
    dtype: jnp.dtype = jnp.float32
    contract_chunk: int = 0

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = dict(impl=self.conv_impl, dtype=self.dtype, chunk=self.contract_chunk)
        bn = dict(impl=self.bn_impl, dtype=self.dtype)
        out_planes = self.planes * self.expansion
        out = Conv(self.planes, 1, 1, 0, name="conv1", **conv)(x)
        out = nn.relu(BatchNorm(name="bn1", **bn)(out, train))
        out = Conv(self.planes, 3, self.stride, 1, name="conv2", **conv)(out)
        out = nn.relu(BatchNorm(name="bn2", **bn)(out, train))
        out = Conv(out_planes, 1, 1, 0, name="conv3", **conv)(out)
        out = BatchNorm(zero_scale=self.zero_init_residual, name="bn3", **bn)(out, train)
        # Stored: else XLA recomputes it inside the next block's residual add (fusion.py).
        return stored(nn.relu(out + _shortcut(self, x, out_planes, train)))


def _shortcut(block: nn.Module, x: jax.Array, out_planes: int, train: bool) -> jax.Array:
    """Identity, or a strided 1x1 conv + BN where the shape changes (torchvision rule)."""
    if block.stride == 1 and x.shape[-1] == out_planes:
        return x
    # Called inside the block's compact __call__, so these become the block's children.
    conv = Conv(out_planes, 1, block.stride, 0, impl=block.conv_impl, dtype=block.dtype,
                chunk=block.contract_chunk, name="downsample_conv")  # fmt: skip
    bn = BatchNorm(impl=block.bn_impl, dtype=block.dtype, name="downsample_bn")
    return bn(conv(x), train)


class ResNet(nn.Module):
    """A torchvision-layout ResNet on NHWC images.

    Attributes:
      stage_sizes: blocks per stage (four stages).
      block_cls: ``BasicBlock`` or ``Bottleneck``.
      num_classes: outputs of ``fc``.
      width: channels of the stem and of stage 1 (64 in torchvision); stage i has
        ``width * 2**(i-1)`` planes.
      stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or 'cifar' (3x3/1 conv,
        BN, ReLU, no pool).
      zero_init_residual: start each block's last BN scale at 0 (torchvision option).
      conv_impl: 'lax' or 'matmul' (see layers.py).
      maxpool_impl: 'lax' or 'deterministic' (see pooling.py).
      bn_impl: 'flax' or 'fused' (see batchnorm.py).
      dtype: compute dtype; parameters stay float32, logits are returned in float32.
      contract_chunk: matmuls contract at most this many terms at a time, summed in order
        (portable CPU mode, contract.py); 0: plain matmuls.
      dropout_rate: dropout on the pooled features, before ``fc``, in train mode only
        (the key is ``apply``'s ``'dropout'`` rng). 0: no dropout op at all, so the
        program is the one without the option.
    """

    stage_sizes: tuple[int, ...]
    block_cls: type
    num_classes: int
    width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    conv_impl: str = "lax"
    maxpool_impl: str = "lax"
    bn_impl: str = "flax"
    dtype: jnp.dtype = jnp.float32
    contract_chunk: int = 0
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Logits (float32), or with ``return_features`` the pooled features (no fc)."""
        x = self._stem(x, train)
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = self.block_cls(
                    planes=self.width * 2**i,
                    stride=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    conv_impl=self.conv_impl,
                    bn_impl=self.bn_impl,
                    dtype=self.dtype,
                    contract_chunk=self.contract_chunk,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
        # Global average pool accumulated in float32 (a bf16 mean over 49 values loses bits).
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if return_features:
            return features
        if self.dropout_rate > 0:  # parameter-free: the parameter tree is the same
            features = nn.Dropout(self.dropout_rate, name="dropout")(features, not train)
        head = Head(self.num_classes, dtype=self.dtype, chunk=self.contract_chunk, name="fc")
        logits = head(features)
        return logits.astype(jnp.float32)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Pooled backbone features, shape (N, feature_dim); use with ``method=``."""
        return self(x, train=train, return_features=True)

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        conv = dict(impl=self.conv_impl, dtype=self.dtype, chunk=self.contract_chunk)
        if self.stem == "imagenet":
            x = Conv(self.width, 7, 2, 3, name="conv1", **conv)(x)
        elif self.stem == "cifar":
            x = Conv(self.width, 3, 1, 1, name="conv1", **conv)(x)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        x = nn.relu(BatchNorm(impl=self.bn_impl, dtype=self.dtype, name="bn1")(x, train))
        if self.stem == "imagenet":
            x = max_pool(x, self.maxpool_impl, window=3, stride=2, padding=1)
        return x
