"""Augmentation on device, in pure JAX, one key per example.

Example ``i`` of epoch ``e`` draws from ``rng.example_keys(aug_phase_root, e, i)``
(``fold_in(fold_in(root, e), i)``), and each op from ``fold_in(that key, op
index)``, so an example's augmentation does not depend on the batch it is in,
the batch size, the device count or a restart; and switching one op off leaves
the draws of the others unchanged.

Ops, in this fixed order, each switched and parameterised by the config
(:func:`default_augment_config`):

1. ``crop``: pad ``padding`` zero pixels on every side, take a random H x W window.
2. ``flip``: mirror left-right with probability ``prob``.
3. ``brightness``: add ``delta ~ U(-max_delta, max_delta)`` (images in [0, 1]).
4. ``contrast``: ``(x - mean) * f + mean``, ``f ~ U(lower, upper)``, per-channel mean.

then clip to [0, 1]. Normalisation (mean/std) is the engine's job, not this file's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxrepro import rng

OPS = ("crop", "flip", "brightness", "contrast")
# Fixed per-op key indices: never reorder (that would change every draw).
_OP_INDEX = {name: i for i, name in enumerate(OPS)}


def default_augment_config() -> ml_collections.ConfigDict:
    """CIFAR-style defaults: crop (padding 4) and flip on; photometric ops off."""
    return ml_collections.ConfigDict(
        {
            "crop": {"enabled": True, "padding": 4},
            "flip": {"enabled": True, "prob": 0.5},
            "brightness": {"enabled": False, "max_delta": 0.2},
            "contrast": {"enabled": False, "lower": 0.8, "upper": 1.2},
        }
    )


def validate_augment_config(cfg) -> None:
    """Raises ValueError naming the field when ``cfg`` is malformed."""
    unknown = set(cfg.keys()) - set(OPS)
    if unknown:
        raise ValueError(f"unknown augmentation ops {sorted(unknown)}; known: {', '.join(OPS)}")
    for op in OPS:
        if op not in cfg or "enabled" not in cfg[op]:
            raise ValueError(f"augmentation config needs {op}.enabled")
    if cfg.crop.padding < 0 or int(cfg.crop.padding) != cfg.crop.padding:
        raise ValueError(f"crop.padding must be an integer >= 0, got {cfg.crop.padding}")
    if not 0.0 <= cfg.flip.prob <= 1.0:
        raise ValueError(f"flip.prob must lie in [0, 1], got {cfg.flip.prob}")
    if cfg.brightness.max_delta < 0:
        raise ValueError(f"brightness.max_delta must be >= 0, got {cfg.brightness.max_delta}")
    if not 0.0 <= cfg.contrast.lower <= cfg.contrast.upper:
        raise ValueError(
            f"need 0 <= contrast.lower <= contrast.upper, got "
            f"{cfg.contrast.lower}, {cfg.contrast.upper}"
        )


def _op_key(key: jax.Array, op: str) -> jax.Array:
    return jax.random.fold_in(key, _OP_INDEX[op])


def _crop(key: jax.Array, image: jax.Array, padding: int) -> jax.Array:
    height, width, channels = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (2,), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), (height, width, channels))


def _flip(key: jax.Array, image: jax.Array, prob: float) -> jax.Array:
    return jnp.where(jax.random.bernoulli(key, prob), image[:, ::-1], image)


def augment_example(key: jax.Array, image: jax.Array, cfg) -> jax.Array:
    """Augments one uint8 [H, W, C] image with its own key; returns float32 in [0, 1]."""
    if cfg.crop.enabled and cfg.crop.padding > 0:
        image = _crop(_op_key(key, "crop"), image, int(cfg.crop.padding))
    if cfg.flip.enabled:
        image = _flip(_op_key(key, "flip"), image, float(cfg.flip.prob))
    photometric = cfg.brightness.enabled or cfg.contrast.enabled
    if not photometric:
        return eval_preprocess(image)
    height, width, _ = image.shape
    # The channel means come from an exact integer sum, so they carry no float
    # rounding that could depend on how XLA tiles the batch.
    mean = jnp.sum(image.astype(jnp.int32), axis=(0, 1)).astype(jnp.float32)
    mean = mean / jnp.float32(height * width * 255)
    x = eval_preprocess(image)
    if cfg.brightness.enabled:
        delta_max = float(cfg.brightness.max_delta)
        delta = jax.random.uniform(
            _op_key(key, "brightness"), (), jnp.float32, -delta_max, delta_max
        )
        x, mean = x + delta, mean + delta  # unclipped, so the mean moves by exactly delta
    if cfg.contrast.enabled:
        lower, upper = float(cfg.contrast.lower), float(cfg.contrast.upper)
        factor = jax.random.uniform(_op_key(key, "contrast"), (), jnp.float32, lower, upper)
        x = (x - mean) * factor + mean
    return jnp.clip(x, 0.0, 1.0)


def augment_batch(
    aug_phase_root: jax.Array, images: jax.Array, epochs: jax.Array, ids: jax.Array, cfg
) -> jax.Array:
    """Augments a batch, each example with its own (epoch, id) key.

    Args:
      aug_phase_root: ``rng.phase_root(aug_root, phase)``.
      images: uint8 [B, H, W, C].
      epochs: int [B], the epoch each example was drawn in (from ``order.batch_ids``).
      ids: int [B], the example ids.
      cfg: augmentation config (see :func:`default_augment_config`); read at trace
        time, so bind it with ``functools.partial`` before ``jax.jit``.

    Returns:
      float32 [B, H, W, C] in [0, 1].
    """
    validate_augment_config(cfg)
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, C], got {images.dtype}{images.shape}")
    if epochs.shape != images.shape[:1] or ids.shape != images.shape[:1]:
        raise ValueError(
            f"epochs {epochs.shape} and ids {ids.shape} must both be [B] with B = {images.shape[0]}"
        )
    keys = rng.example_keys(aug_phase_root, epochs, ids)
    return jax.vmap(lambda key, image: augment_example(key, image, cfg))(keys, images)


def eval_preprocess(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1] (no randomness; evaluation and disabled ops)."""
    return images.astype(jnp.float32) / jnp.float32(255.0)


def channel_stats(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and standard deviation over all but the last axis."""
    axes = tuple(range(images.ndim - 1))
    return jnp.mean(images, axis=axes), jnp.std(images, axis=axes)
