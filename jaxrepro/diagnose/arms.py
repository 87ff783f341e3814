"""The arms of a diagnosis: what each changes from the restore point on.

``--arms=exact,aug:4,order:2,skip,lr:0.5,clip:1.0`` expands into single arms:

* ``exact``: nothing changed; must be bitwise the original.
* ``aug:N``: N other augmentation draws. Arm i uses the augmentation root
  ``fold_in(aug_root, AUG_SALT + i)`` for every step from the restore point on; the
  state, the example order and everything else are the original's.
* ``order:N``: the example order of the remaining steps redrawn N times. Within the
  epoch of the restore step, the examples not yet seen by then (the rest of that epoch's
  permutation) are permuted again with the arm's key, so each example is still seen once
  that epoch; every later epoch is a fresh permutation drawn from the arm's key. Steps
  before the restore point are the original's.
* ``skip``: the batch of the onset step is skipped, as in PaLM's spike recovery: from the
  onset step on, step s trains on the batch the original trained on at s + 1. The step
  counter, the learning-rate schedule and the per-step keys advance as in the original
  (step s is still step s); the batches shift by one, and each example keeps its own
  per-example augmentation key (keys derive from the example id and epoch).
  ``skip:-K`` skips the batch K steps before the onset instead (a control: an unrelated
  batch), so the onset's batch is read one step earlier.
* ``lr:F``: the learning rate times F from the restore point on (an input of the
  compiled step, so training and every arm share one program; F = 1 is bit-identical).
* ``clip:G``: the gradient's global norm clipped at G from the restore point on (an
  input too; G = inf is bit-identical).
"""

from __future__ import annotations

import dataclasses
import math

from jaxrepro.errors import ConfigError

DEFAULT_ARMS = "exact,aug:4,order:2,skip,lr:0.5,clip:1.0"
AUG_SALT = 0x5EED0000  # arm i's augmentation root: fold_in(aug_root, AUG_SALT + i)
ORDER_SALT = 0x0DE20000  # arm i's order key: fold_in(data_root, ORDER_SALT + i)
FAMILIES = ("exact", "aug", "order", "skip", "lr", "clip")
_COUNTED = ("aug", "order")  # kind:N, N arms
_VALUED = ("lr", "clip")  # kind:value, one arm


@dataclasses.dataclass(frozen=True)
class Arm:
    """One replay branch: ``family`` and its index or value."""

    family: str
    index: int = 0
    value: float | None = None

    @property
    def name(self) -> str:
        if self.family in _COUNTED:
            return f"{self.family}{self.index}"
        if self.family in _VALUED:
            return f"{self.family}{self.value:g}"
        if self.family == "skip" and self.index:
            return f"skip{self.index}"
        return self.family

    @property
    def lr_scale(self) -> float:
        return float(self.value) if self.family == "lr" else 1.0

    @property
    def clip_norm(self) -> float:
        return float(self.value) if self.family == "clip" else math.inf

    @property
    def remedy(self) -> bool:
        return self.family in _VALUED


def parse_arms(text: str) -> list[Arm]:
    """``exact,aug:4,...`` -> the single arms, in order; a clear error on bad input."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--arms is empty; e.g. --arms=" + DEFAULT_ARMS)
    arms: list[Arm] = []
    for word in (w.strip() for w in text.split(",")):
        family, sep, arg = word.partition(":")
        if family not in FAMILIES:
            raise ConfigError(f"--arms: unknown arm {word!r}; known: {', '.join(FAMILIES)}")
        if family == "exact" or (family == "skip" and not sep):
            if sep:
                raise ConfigError(f"--arms: {family!r} takes no value, got {word!r}")
            arms.append(Arm(family))
        elif family == "skip":
            try:
                offset = int(arg)
            except ValueError:
                offset = 1
            if offset > 0 or str(offset) != arg:
                raise ConfigError(
                    f"--arms: {word!r}: skip:-K skips the batch K steps before the onset "
                    "(an integer <= 0)"
                )
            arms.append(Arm(family, offset))
        elif family in _COUNTED:
            try:
                n = int(arg)
            except ValueError:
                n = 0
            if n < 1 or str(n) != arg:
                raise ConfigError(f"--arms: {word!r} needs a count >= 1, e.g. {family}:4")
            arms.extend(Arm(family, i) for i in range(n))
        else:
            try:
                value = float(arg)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"--arms: {word!r} needs a positive finite number, e.g. {family}:0.5"
                )
            arms.append(Arm(family, value=value))
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--arms: arms given twice: {', '.join(dup)}")
    return arms
