"""Example order: which example ids every step of a phase reads. Pure.

The order of epoch ``e`` of phase ``p`` is one permutation of ``range(N)`` drawn
from ``rng.epoch_key(rng.phase_root(data_root, p), e)``: nothing but the data
factor's root, the phase and the epoch decides it, so resuming at step ``s``
needs ``s`` alone, and changing the batch size regroups the same order.

Permutations are computed on the CPU backend whatever the default device, so the
order is the same on every platform, and cached (a few at a time) because every
step of an epoch reads the same one.

Remainder policies (``N`` examples, batch size ``B``):

* ``'drop'``: each epoch is ``N // B`` full batches; the last ``N % B`` examples
  of each epoch's permutation are not used in that epoch. Every batch lies in one
  epoch. ``B > N`` is an error.
* ``'stream'``: the epochs' permutations are concatenated into one stream that
  is cut into batches of ``B``; a batch may straddle two epochs (its ``epochs``
  row says which example comes from which), and every example is used once per
  epoch.
"""

from __future__ import annotations

import functools
import logging
import math
import typing

import jax
import numpy as np

from jaxrepro import rng

REMAINDERS = ("drop", "stream")


def _check(batch_size: int, num_examples: int, remainder: str) -> None:
    if remainder not in REMAINDERS:
        raise ValueError(f"unknown remainder policy {remainder!r}; known: {', '.join(REMAINDERS)}")
    if int(batch_size) < 1 or int(num_examples) < 1:
        raise ValueError(
            f"batch_size and num_examples must be >= 1, got {batch_size} and {num_examples}"
        )
    if remainder == "drop" and batch_size > num_examples:
        raise ValueError(
            f"batch_size {batch_size} > num_examples {num_examples} with remainder='drop' "
            "would give epochs of zero steps; use a smaller batch or remainder='stream'"
        )


def steps_per_epoch(num_examples: int, batch_size: int, remainder: str = "drop") -> int:
    """Steps per epoch: ``N // B`` for 'drop'; ``ceil(N / B)`` for 'stream'.

    With 'stream' epochs do not align with steps; ``ceil(N / B)`` steps are enough
    to consume one epoch's worth of examples. Use :func:`num_steps` to convert a
    number of epochs exactly.
    """
    _check(batch_size, num_examples, remainder)
    if remainder == "drop":
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def num_steps(num_examples: int, batch_size: int, epochs: int, remainder: str = "drop") -> int:
    """Steps that train for ``epochs`` epochs (for 'stream': rounded up to a whole batch)."""
    _check(batch_size, num_examples, remainder)
    if remainder == "drop":
        return epochs * (num_examples // batch_size)
    return math.ceil(epochs * num_examples / batch_size)


def _cpu_device():
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: threefry bits agree across backends
        logging.warning("no CPU backend: computing the example order on the default device")
        return None


@functools.lru_cache(maxsize=8)
def _permutation(key_bytes: bytes, impl: str, phase: str, epoch: int, n: int) -> np.ndarray:
    data = np.frombuffer(key_bytes, np.uint32)
    device = _cpu_device()
    root = jax.random.wrap_key_data(jax.device_put(data, device), impl=impl)
    key = rng.epoch_key(rng.phase_root(root, phase), epoch)
    perm = np.asarray(jax.device_get(jax.random.permutation(key, n)), np.int64)
    perm.flags.writeable = False  # shared by the cache
    return perm


class HostKey(typing.NamedTuple):
    """A data root key as host bytes: what the example order needs of it, read once."""

    data: bytes
    impl: str


def host_key(data_root: jax.Array | HostKey) -> HostKey:
    """``data_root`` as a ``HostKey``; a training loop makes it once, not at every step
    (each read of a device key is a dispatch and a fetch while the step computes)."""
    if isinstance(data_root, HostKey):
        return data_root
    key_data = np.asarray(jax.device_get(rng.key_data(data_root)), np.uint32)
    return HostKey(key_data.tobytes(), str(jax.random.key_impl(data_root)))


def permutation(
    data_root: jax.Array | HostKey, phase: str, epoch: int, num_examples: int
) -> np.ndarray:
    """The example order of one epoch of one phase: a permutation of ``range(N)``."""
    rng.phase_index(phase)  # validates the phase name
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    key = host_key(data_root)
    return _permutation(key.data, key.impl, phase, int(epoch), int(num_examples))


def batch_ids(
    data_root: jax.Array | HostKey,
    phase: str,
    step_in_phase: int,
    batch_size: int,
    num_examples: int,
    remainder: str = "drop",
) -> tuple[np.ndarray, np.ndarray]:
    """The example ids of one step, and the epoch each one belongs to.

    Args:
      data_root: the data factor's root key (``rng.factor_root('data', seed)``), or its
        ``host_key``.
      phase: ``'pretrain'`` or ``'finetune'``.
      step_in_phase: the step, counted from 0 at the start of the phase.
      batch_size: examples per step (B).
      num_examples: examples in the split (N).
      remainder: ``'drop'`` or ``'stream'`` (see the module docstring).

    Returns:
      ``(ids, epochs)``, both ``np.int64[B]``.
    """
    _check(batch_size, num_examples, remainder)
    return _ids(
        lambda epoch: permutation(data_root, phase, epoch, num_examples),
        step_in_phase,
        batch_size,
        num_examples,
        remainder,
    )


def _ids(perm_of, step_in_phase: int, batch_size: int, num_examples: int, remainder: str):
    """``batch_ids`` with the epochs' permutations from ``perm_of(epoch)``."""
    step = int(step_in_phase)
    if step < 0:
        raise ValueError(f"step_in_phase must be >= 0, got {step_in_phase}")
    if remainder == "drop":
        epoch, within = divmod(step, num_examples // batch_size)
        start = within * batch_size
        ids = perm_of(epoch)[start : start + batch_size]
        return ids.copy(), np.full(batch_size, epoch, np.int64)
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    ids = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        ids[rows] = perm_of(int(epoch))[offsets[rows]]
    return ids, epochs


def redrawn_batch_ids(
    data_root,
    arm_root,
    phase: str,
    step_in_phase: int,
    from_step_in_phase: int,
    batch_size: int,
    num_examples: int,
    remainder: str = "drop",
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_ids`` with the order redrawn from ``from_step_in_phase`` on (a diagnosis arm).

    Steps before it read the original order. In the epoch that step falls in, the examples
    already seen keep their places and the rest of that epoch's permutation (the examples
    not yet seen) is permuted again with ``arm_root``'s permutation of that epoch; every
    later epoch is ``arm_root``'s own permutation. So each example is still read once per
    epoch.
    """
    _check(batch_size, num_examples, remainder)
    start = int(from_step_in_phase)
    if int(step_in_phase) < start:
        return batch_ids(data_root, phase, step_in_phase, batch_size, num_examples, remainder)
    if remainder == "drop":
        first, within = divmod(start, num_examples // batch_size)
        seen = within * batch_size
    else:
        first, seen = divmod(start * batch_size, num_examples)

    def perm_of(epoch: int) -> np.ndarray:
        if epoch > first:
            return permutation(arm_root, phase, epoch, num_examples)
        original = permutation(data_root, phase, epoch, num_examples)
        rest = original[seen:]
        return np.concatenate(
            [original[:seen], rest[permutation(arm_root, phase, epoch, len(rest))]]
        )

    return _ids(perm_of, step_in_phase, batch_size, num_examples, remainder)
