"""The only place that makes PRNG keys.

Randomness is split into factors (docs/design.md), each with its own seed. A factor's
root key is derived from its seed and the factor's fixed index, so two factors
with the same seed still draw independent streams. Every other key is derived
from a root with ``fold_in``, never carried and never split from hidden state:

* per-step draws:      ``step_key(root, step)``
* per-example draws:   ``example_key(root, epoch, example_id)``
* per-phase streams:   ``phase_root(root, phase)``

so an example's augmentation is the same whatever the batch size, device count
or restart, and resuming needs the step alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FACTORS = ("init", "head", "data", "aug", "dropout")
# Fixed indices: never reorder, only append (changing them changes every key).
_FACTOR_INDEX = {name: i for i, name in enumerate(FACTORS)}
PHASES = ("pretrain", "finetune")
_PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}

PRNG_IMPL = "threefry2x32"
THREEFRY_PARTITIONABLE = True


def configure() -> dict:
    """Sets the PRNG implementation and partitionable threefry explicitly.

    Called before any key is made (import of this module, and again by every
    entry point). Returns the settings, for run.json.
    """
    jax.config.update("jax_default_prng_impl", PRNG_IMPL)
    jax.config.update("jax_threefry_partitionable", THREEFRY_PARTITIONABLE)
    return settings()


def settings() -> dict:
    return {
        "prng_impl": jax.config.jax_default_prng_impl,
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    }


configure()


def resolve_seeds(config) -> dict[str, int]:
    """The seed of every factor: ``config.seeds.<factor>``, else ``config.seed``."""
    seeds = {}
    for name in FACTORS:
        value = config.seeds.get(name) if "seeds" in config else None
        seeds[name] = int(config.seed if value is None else value)
    return seeds


def factor_root(factor: str, seed: int) -> jax.Array:
    """The root key of one randomness factor."""
    if factor not in _FACTOR_INDEX:
        raise ValueError(f"unknown randomness factor {factor!r}; known: {', '.join(FACTORS)}")
    base = jax.random.key(int(seed), impl=PRNG_IMPL)
    return jax.random.fold_in(base, _FACTOR_INDEX[factor])


def roots(seeds: dict[str, int]) -> dict[str, jax.Array]:
    """Root keys of all factors from resolved seeds."""
    return {name: factor_root(name, seeds[name]) for name in FACTORS}


def phase_index(phase: str) -> int:
    if phase not in _PHASE_INDEX:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    return _PHASE_INDEX[phase]


def phase_root(root: jax.Array, phase: str) -> jax.Array:
    """A factor's stream for one phase (pretrain and finetune never share draws)."""
    return jax.random.fold_in(root, phase_index(phase))


def step_key(root: jax.Array, step) -> jax.Array:
    """Key for a per-step draw (e.g. dropout at step ``step``)."""
    return jax.random.fold_in(root, step)


def branch_root(root: jax.Array, branch: int) -> jax.Array:
    """Another root for the same factor: a diagnosis arm's own draws (diagnose/arms.py)."""
    return jax.random.fold_in(root, branch)


def epoch_key(root: jax.Array, epoch) -> jax.Array:
    """Key for a per-epoch draw (e.g. the example order of ``epoch``)."""
    return jax.random.fold_in(root, epoch)


def example_key(root: jax.Array, epoch, example_id) -> jax.Array:
    """Key for a per-example draw: ``fold_in(fold_in(root, epoch), example_id)``."""
    return jax.random.fold_in(jax.random.fold_in(root, epoch), example_id)


def example_keys(root: jax.Array, epochs: jax.Array, example_ids: jax.Array) -> jax.Array:
    """Vectorised ``example_key`` over a batch of (epoch, example_id) pairs."""
    epochs = jnp.asarray(epochs, jnp.uint32)
    example_ids = jnp.asarray(example_ids, jnp.uint32)
    return jax.vmap(lambda e, i: example_key(root, e, i))(epochs, example_ids)


def key_data(key: jax.Array):
    """Raw uint32 words of a typed key (for hashing and recording)."""
    return jax.random.key_data(key)
