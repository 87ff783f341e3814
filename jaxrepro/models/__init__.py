"""The ResNet family: ``build`` a model by name, and helpers for swapping its head.

Example::

    model = models.build("resnet50", 10, stem="cifar")
    variables = model.init(init_key, images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    feats = model.apply(variables, images, method="features")
    head = models.init_head(head_key, models.feature_dim("resnet50"), 5)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrepro.models.batchnorm import BN_IMPLS, BatchNorm
from jaxrepro.models.init import init_variables
from jaxrepro.models.layers import CONV_IMPLS, Conv, Head
from jaxrepro.models.pooling import MAXPOOL_IMPLS, max_pool_deterministic, max_pool_lax
from jaxrepro.models.resnet import STEMS, BasicBlock, Bottleneck, ResNet

# name -> (block class, blocks per stage, default width)
_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 64),
    "resnet_tiny": (BasicBlock, (1, 1, 1, 1), 8),
}
MODEL_NAMES = tuple(_SPECS)
DTYPES = ("float32", "bfloat16", "float16")

__all__ = [
    "BN_IMPLS", "CONV_IMPLS", "DTYPES", "MAXPOOL_IMPLS", "MODEL_NAMES", "STEMS",
    "BasicBlock", "BatchNorm", "Bottleneck", "Conv", "Head", "ResNet",
    "build", "count_params", "feature_dim", "init_head", "init_variables",
    "max_pool_deterministic", "max_pool_lax",
]  # fmt: skip


def _choice(kind: str, value, valid: tuple[str, ...]):
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def _spec(name: str):
    return _SPECS[_choice("model name", name, MODEL_NAMES)]


def _dtype(dtype) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return jnp.dtype(_choice("dtype", name, DTYPES))


def _width(name: str, width: int | None) -> int:
    if width is None:
        return _spec(name)[2]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    return width


def build(
    name: str,
    num_classes: int,
    *,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
    conv_impl: str = "lax",
    maxpool_impl: str = "lax",
    dtype="float32",
    width: int | None = None,
    bn_impl: str = "flax",
    contract_chunk: int = 0,
    dropout_rate: float = 0.0,
) -> ResNet:
    """Builds a ResNet by name.

    Args:
      name: one of ``MODEL_NAMES``.
      num_classes: outputs of the classifier (positive).
      stem: 'imagenet' or 'cifar'.
      zero_init_residual: start each block's last BN scale at 0.
      conv_impl: 'lax' (XLA convolutions; GPU/TPU) or 'matmul' (fast on XLA:CPU).
      maxpool_impl: 'lax' or 'deterministic' (scatter-free gradient, for
        ``--xla_gpu_deterministic_ops``).
      dtype: compute dtype, 'float32', 'bfloat16' or 'float16'; params stay float32.
      width: stem / stage-1 channels; None for the model's default (64, tiny: 8).
      bn_impl: 'flax' (autodiff BatchNorm) or 'fused' (custom_vjp backward).
      contract_chunk: contract matmuls in chunks of at most this many terms, added in
        order (portable CPU mode; needs conv_impl 'matmul'); 0: plain matmuls.
      dropout_rate: dropout before ``fc`` in train mode, in [0, 1); training then needs
        ``apply(..., rngs={'dropout': key})``. 0: no dropout op.

    Returns:
      The (unbound) Flax module. ``apply(variables, images_nhwc, train=...)`` gives logits.

    Raises:
      ValueError: for an unknown name, stem, impl or dtype, or a bad count.
    """
    block_cls, stages, _ = _spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(contract_chunk, bool) or not isinstance(contract_chunk, int):
        raise ValueError(f"contract_chunk must be an int, got {contract_chunk!r}")
    if contract_chunk < 0 or (contract_chunk and conv_impl != "matmul"):
        raise ValueError(
            f"contract_chunk={contract_chunk} needs conv_impl 'matmul' and a positive chunk"
        )
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, int | float):
        raise ValueError(f"dropout_rate must be a number, got {dropout_rate!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    return ResNet(
        stage_sizes=stages,
        block_cls=block_cls,
        num_classes=num_classes,
        width=_width(name, width),
        stem=_choice("stem", stem, STEMS),
        zero_init_residual=bool(zero_init_residual),
        conv_impl=_choice("conv_impl", conv_impl, CONV_IMPLS),
        maxpool_impl=_choice("maxpool_impl", maxpool_impl, MAXPOOL_IMPLS),
        bn_impl=_choice("bn_impl", bn_impl, BN_IMPLS),
        dtype=_dtype(dtype),
        contract_chunk=contract_chunk,
        dropout_rate=float(dropout_rate),
    )


def feature_dim(name: str, width: int | None = None) -> int:
    """Size of the pooled features that feed ``fc`` (2048 for ResNet-50)."""
    block_cls, _, _ = _spec(name)
    return _width(name, width) * 8 * block_cls.expansion


def init_head(key: jax.Array, feature_dim: int, num_classes: int, dtype=jnp.float32) -> dict:
    """A fresh classifier head ``{'kernel': (feature_dim, num_classes), 'bias'}``.

    Drawn by the very module that is the model's ``fc`` (``Head``, torch.nn.Linear's
    default U(-1/sqrt(in), 1/sqrt(in))), so ``Head(num_classes).init(key, ...)`` gives
    the same bits. ``dtype`` is the parameters' dtype.
    """
    if feature_dim < 1 or num_classes < 1:
        raise ValueError(f"feature_dim and num_classes must be >= 1, got {feature_dim}, "
                         f"{num_classes}")  # fmt: skip
    head = Head(num_classes, param_dtype=jnp.dtype(dtype))
    return head.init(key, jnp.zeros((1, feature_dim), jnp.float32))["params"]


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))
