r"""``jaxrepro bench detector``: the drop-off detector scored on labelled streams.

    jaxrepro bench detector [seeds=16 sets=tuned,held_out_params,held_out_families
                             labels=results/bench/detector_labels.json record=current]

Writes ``detector.json`` in ``--out`` (default ``results/bench``). The streams are made
here, by a generator that does not use the detector's code, from a stated rule; the
detector sees only the rows, the scorer only the labels and the detector's episodes.

**A stream** is a run's metrics rows, two phases (``pretrain``, then ``finetune``), as
the engine writes them: a train row per step (``loss``, ``finite``), eval rows of one
split (``source_test``) at phase step 0, every ``eval_every`` steps and after the last
step. Per phase:

* the loss level decays, ``L(t) = L_inf + (L0 - L_inf) exp(-t / tau)`` (``L0`` 1.5-3,
  ``L_inf`` 2-50% of it, ``tau`` 10-40% of the phase), and its first steps are a
  transient (steps 1..8 at up to 3x the level, falling back: a new head and a fresh
  optimizer, as on the digits curves);
* each train loss is the level times batch noise ``exp(s * z)``; ``z`` is drawn from a
  noise family and standardised so that its median is 0 and its robust standard
  deviation (1.4826 MAD) is 1, so ``s`` is the robust sd of the log loss: 0.02 (smooth)
  to 0.6 (very noisy). The families are right-skewed in the loss (the loss is
  ``exp`` of them): tuned on ``lognormal`` (normal z), ``gamma`` (log of a gamma(2)
  draw), ``mixture`` (normal z, and 5% of the batches 2-4.5 sd higher: hard batches);
  held out: ``student_t`` (t with 3 degrees of freedom: heavy on both sides),
  ``batch_ce`` (the mean cross-entropy of 32 examples whose margins are normal(2, 1.5):
  what a batch loss is), ``inv_gamma`` (minus the log of a gamma(3) draw: an
  exponential right tail in log space);
* the eval accuracy rises from chance (0.1) to a plateau (0.55-0.98) with eval noise of
  sd ``sigma_e`` (0.005-0.04 in accuracy).

**The rule** (what is an event; anything less is noise and must stay quiet):

* *spike*: one train loss at least ``SPIKE_RATIO`` (4) times the local level and at
  least ``SPIKE_Z`` (5) robust sd above it in log space: ``log(v / L) >= max(log 4,
  5 s)``. A noise draw that would meet this is redrawn (by the rule it would be an
  event); planted spikes are 1.3-2.5x the rule's log size, and every stream also holds
  two sub-rule spikes (0.3-0.7x) that must stay quiet;
* *shift*: the level jumps and stays (to the end of the phase), by at least
  ``max(log 1.5, 2 s)`` in log space; planted 1.25-2.5x that;
* *ramp*: the log level climbs linearly over 20-80 steps by at least ``max(log 3,
  4 s)`` (planted 1-2x that) from its value at the onset (the curve's decay is replaced
  by the climb, not added to it: added, the steep early decay of a curve cancelled up to
  all of the climb), then stays there (it decays on from the top at the curve's own
  rate), or (a third of them) the run diverges: the last row is a NaN loss (labelled
  as a *nonfinite* event too);
* *collapse* (sudden or gradual): the eval accuracy level falls from where it was at
  the eval before by at least ``max(0.2, 5 sigma_e)`` and stays down; sudden: at one
  eval, planted 1.25x the rule up to a fall to chance; gradual: linearly over 3-6 evals,
  planted 1.5x the rule up to chance. The first lower eval is the 5th eval of the phase
  or later, with two evals after the fall; in a phase of too few evals for that, the
  3rd, the fall shortened to end one eval before the phase's last (never from the
  phase's first eval, before any training). Noise-only streams also hold single-eval
  dips of at most 0.3x the rule;
* *nonfinite*: a NaN or Inf loss, or a row with ``finite: false``: once, a burst of
  2-5 rows, or the last row of a run that stops there.

**Noise-only** streams hold no event (only noise, transients and sub-rule spikes and
dips).

**Scoring**: an episode of the detector *matches* a labelled event when it is on the
same metric (the loss, or the split's accuracy) and its onset ``step`` lies within the
class's tolerance of the labelled onset (:data:`TOLERANCE`: exact for spikes and
non-finite values, the step a replay must branch before; 5 steps either side for a
shift; 10 before to a quarter of the ramp's length after for a ramp; one eval early
for a sudden collapse, one eval either side for a gradual one). Recall per class: the
fraction of labelled events matched. Precision over all streams: the fraction of the
detector's episodes that match a labelled event, each event matching one episode (a
second episode on the same event is a false alarm). False alarms per 1,000 logged
train steps: the episodes on noise-only streams over their train rows. Three sets:
``tuned`` (tuned families and parameters: thresholds were chosen looking at these),
``held_out_params`` (tuned families, noise levels, eval noise and eval intervals not
used in tuning), ``held_out_families`` (held-out families at all noise levels).

**Real curves**: ``labels=`` names a JSON file of hand labels of real runs' rows (its
``rule`` says how they were made); they are scored the same way.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time

import numpy as np

CLASSES = (
    "spike",
    "shift",
    "ramp",
    "collapse_sudden",
    "collapse_gradual",
    "nonfinite",
)
NOISE = "noise"
SPIKE_RATIO = 4.0
SPIKE_Z = 5.0
SHIFT_RATIO = 1.5
SHIFT_Z = 2.0
RAMP_RATIO = 3.0
RAMP_Z = 4.0
COLLAPSE_MIN = 0.2
COLLAPSE_Z = 5.0
CHANCE = 0.1
SPLIT = "source_test"
TRANSIENT_STEPS = 9  # phase steps 1..8 may be a transient (the detector's exclusion: 10)
_MAD_SCALE = 1.4826

FAMILIES_TUNED = ("lognormal", "gamma", "mixture")
FAMILIES_HELD_OUT = ("student_t", "batch_ce", "inv_gamma")
SETS = {
    "tuned": {
        "families": FAMILIES_TUNED,
        "s": (0.02, 0.05, 0.1, 0.2, 0.35, 0.5),
        "sigma_e": (0.005, 0.015, 0.03),
        "eval_every": (10, 20),
    },
    "held_out_params": {
        "families": FAMILIES_TUNED,
        "s": (0.03, 0.15, 0.28, 0.42, 0.6),
        "sigma_e": (0.01, 0.04),
        "eval_every": (15, 30),
    },
    "held_out_families": {
        "families": FAMILIES_HELD_OUT,
        "s": (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.03, 0.15, 0.28, 0.42, 0.6),
        "sigma_e": (0.005, 0.015, 0.03, 0.01, 0.04),
        "eval_every": (10, 20, 15, 30),
    },
}
DEFAULTS = {
    "seeds": 16,  # 240-576 events a class per set (8: one event moved a recall 0.3-0.8 points)
    "sets": "tuned,held_out_params,held_out_families",
    "labels": "results/bench/detector_labels.json",
    "record": "current",
}


def tolerance(label: dict) -> tuple[int, int]:
    """(steps before, steps after) the labelled onset within which an episode matches."""
    cls = label["class"]
    if cls in ("spike", "nonfinite"):
        return 0, 0
    if cls == "shift":
        return 5, 5
    if cls == "ramp":
        return 10, max(5, label.get("length", 20) // 4)
    every = label.get("eval_every", 20)
    if cls == "collapse_sudden":
        return every, 0
    return every, every  # collapse_gradual


TOLERANCE = {
    "spike": "exact step",
    "nonfinite": "exact step",
    "shift": "5 steps before to 5 after",
    "ramp": "10 steps before to max(5, ramp length / 4) after",
    "collapse_sudden": "one eval before to the collapse's eval",
    "collapse_gradual": "one eval before to one eval after the first lower eval",
}


# ----------------------------------------------------------------------------- noise


def _raw_log(family: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Unstandardised log-space draws of a family (the loss is exp of them)."""
    if family == "lognormal":
        return rng.standard_normal(n)
    if family == "gamma":
        return np.log(rng.gamma(2.0, size=n))
    if family == "mixture":
        hard = rng.random(n) < 0.05
        return rng.standard_normal(n) + hard * rng.uniform(2.0, 4.5, n)
    if family == "student_t":
        return rng.standard_t(3.0, n)
    if family == "batch_ce":
        margins = rng.normal(2.0, 1.5, size=(n, 32))
        return np.log(np.log1p(9.0 * np.exp(-margins)).mean(axis=1))
    if family == "inv_gamma":
        return -np.log(rng.gamma(3.0, size=n))
    raise ValueError(f"unknown noise family {family!r}")


@functools.cache
def _standardisation(family: str) -> tuple[float, float]:
    """(median, robust sd) of a family's log draws, from 200,000 draws of a fixed seed."""
    x = _raw_log(family, np.random.default_rng(20240917), 200_000)
    med = float(np.median(x))
    return med, float(_MAD_SCALE * np.median(np.abs(x - med)))


def noise(family: str, s: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """Log-space batch noise of robust sd ``s``, redrawn where it would meet the spike rule."""
    med, sd = _standardisation(family)
    z = (_raw_log(family, rng, n) - med) / sd
    limit = max(math.log(SPIKE_RATIO) / s, SPIKE_Z)  # in sd units
    for _ in range(100):
        bad = z >= limit
        if not bad.any():
            break
        z[bad] = (_raw_log(family, rng, int(bad.sum())) - med) / sd
    return s * np.minimum(z, limit * 0.999)


def spike_rule(s: float) -> float:
    """The smallest log rise over the level that is a spike at noise ``s``."""
    return max(math.log(SPIKE_RATIO), SPIKE_Z * s)


def shift_rule(s: float) -> float:
    return max(math.log(SHIFT_RATIO), SHIFT_Z * s)


def ramp_rule(s: float) -> float:
    return max(math.log(RAMP_RATIO), RAMP_Z * s)


def collapse_rule(sigma_e: float) -> float:
    return max(COLLAPSE_MIN, COLLAPSE_Z * sigma_e)


# ----------------------------------------------------------------------------- streams


def _phase_curves(rng, n: int, s: float, family: str, evals: list[int], sigma_e: float):
    """(log level, log noise, accuracy level at the evals) of one phase."""
    t = np.arange(n)
    l0 = rng.uniform(1.5, 3.0)
    l_inf = l0 * rng.uniform(0.02, 0.5)
    tau = n * rng.uniform(0.1, 0.4)
    level = np.log(l_inf + (l0 - l_inf) * np.exp(-t / tau))
    n_tr = int(rng.integers(3, TRANSIENT_STEPS + 1))
    amp = rng.uniform(0.0, 2.0)
    tr = np.arange(1, n_tr)
    level[tr] += np.log1p(amp * (1 - (tr - 1) / max(n_tr - 1, 1)))
    a_max = rng.uniform(0.55, 0.98)
    tau_a = n * rng.uniform(0.1, 0.3)
    ev = np.asarray(evals, dtype=float)
    acc = CHANCE + (a_max - CHANCE) * (1 - np.exp(-ev / tau_a))
    return level, noise(family, s, rng, n), acc, rng.normal(0.0, sigma_e, len(evals))


def _eval_steps(n: int, every: int) -> list[int]:
    """Phase steps of the evals: 0, every, 2 every, ... and after the last step (n)."""
    return sorted({*range(0, n, every), n})


def make_stream(spec: dict) -> tuple[list[dict], list[dict], dict]:
    """One labelled stream.

    Args:
        spec: ``{"family", "s", "sigma_e", "eval_every", "class", "seed"}``.

    Returns:
        ``(rows, labels, info)``: the metrics rows in logged order; the labelled events
        (``class``, ``metric``, ``phase``, ``step`` (the onset), and class details);
        what was planted, distractors included.
    """
    rng = np.random.default_rng(spec["seed"])
    cls, s, sigma_e, every = spec["class"], spec["s"], spec["sigma_e"], spec["eval_every"]
    lengths = {"pretrain": int(rng.integers(160, 401)), "finetune": int(rng.integers(140, 261))}
    phases = {}
    for name, n in lengths.items():
        evals = _eval_steps(n, every)
        level, eps, acc, acc_noise = _phase_curves(rng, n, s, spec["family"], evals, sigma_e)
        phases[name] = {
            "n": n,
            "level": level,
            "eps": eps,
            "evals": evals,
            "acc": acc,
            "acc_noise": acc_noise,
            "loss_override": {},  # phase step -> log rise replacing the noise (spikes)
            "nonfinite": {},  # phase step -> "nan" | "inf" | "flag"
            "busy": [],  # (from, to) phase steps where no distractor may go
        }
    labels, info = [], {"distractors": [], "truncate": None}
    target = str(rng.choice(["pretrain", "finetune"]))
    p = phases[target]
    n = p["n"]
    if cls == "spike":
        at = int(rng.integers(30, n - 5))
        size = spike_rule(s) * rng.uniform(1.3, 2.5)
        p["loss_override"][at] = size
        p["busy"].append((at - 20, at + 20))
        labels.append({"class": cls, "metric": "loss", "phase": target, "at": at, "size": size})
    elif cls == "shift":
        at = int(rng.integers(40, n - 40))
        size = shift_rule(s) * rng.uniform(1.25, 2.5)
        p["level"][at:] += size
        p["busy"].append((at - 20, n))
        labels.append({"class": cls, "metric": "loss", "phase": target, "at": at, "size": size})
    elif cls == "ramp":
        length = int(rng.integers(20, 81))
        at = int(rng.integers(40, max(41, n - length - 20)))
        size = ramp_rule(s) * rng.uniform(1.0, 2.0)
        # The level climbs by ``size`` from where it was at the onset: the curve's own
        # decay is replaced during the climb (added to it, a steep early decay would
        # cancel most of the planted climb), and goes on from the top after it.
        top = min(at + length - 1, n - 1)
        lv = p["level"]
        climb = lv[at - 1] + size * (np.arange(at, top + 1) - at + 1) / length
        lv[top + 1 :] += climb[-1] - lv[top]
        lv[at : top + 1] = climb
        p["busy"].append((at - 20, n))
        labels.append(
            {
                "class": cls,
                "metric": "loss",
                "phase": target,
                "at": at,
                "size": size,
                "length": length,
            }
        )
        if rng.random() < 1 / 3:  # diverges: a NaN loss ends the run at the ramp's top
            end = min(at + length, n - 1)
            p["nonfinite"][end] = "nan"
            info["truncate"] = (target, end)
            labels.append({"class": "nonfinite", "metric": "loss", "phase": target, "at": end})
    elif cls in ("collapse_sudden", "collapse_gradual"):
        k_evals = len(p["evals"])
        grad = int(rng.integers(3, 7)) if cls == "collapse_gradual" else 1
        lo = collapse_rule(sigma_e) * (1.25 if grad == 1 else 1.5)
        # After 4 evals, with room for the rule's fall and for 2 evals after the collapse.
        room_ok = [k for k in range(4, k_evals - grad - 1) if p["acc"][k - 1] - CHANCE >= lo + 0.02]
        k0 = int(rng.choice(room_ok)) if room_ok else max(2, min(4, k_evals - grad - 2))
        if k0 + grad > k_evals - 1:  # a phase of few evals: a shorter fall, one eval after it
            grad = k_evals - 1 - k0
        if not room_ok:  # a slow riser: lift its plateau so that the fall fits above chance
            p["acc"] = p["acc"] + (lo + 0.02 - (p["acc"][k0 - 1] - CHANCE))
        # From its level before the collapse (the curve stops rising there), down by
        # ``drop`` at once or linearly over ``grad`` evals, and it stays down.
        before = p["acc"][k0 - 1]
        drop = rng.uniform(lo, max(lo, before - CHANCE))
        ramp = np.clip((np.arange(k_evals) - k0 + 1) / grad, 0.0, 1.0)
        p["acc"] = np.where(ramp > 0, before - drop * ramp, p["acc"])
        at = p["evals"][k0]
        labels.append(
            {
                "class": cls,
                "metric": f"accuracy/{SPLIT}",
                "phase": target,
                "at": at,
                "size": drop,
                "evals": grad,
                "eval_every": every,
            }
        )
    elif cls == "nonfinite":
        at = int(rng.integers(1, n - 10))
        how = str(rng.choice(["once", "burst", "stop", "flag"]))
        count = int(rng.integers(2, 6)) if how == "burst" else 1
        for k in range(count):
            p["nonfinite"][at + k] = "flag" if how == "flag" else str(rng.choice(["nan", "inf"]))
        if how == "stop":
            info["truncate"] = (target, at)
        p["busy"].append((at - 20, at + count + 20))
        labels.append({"class": cls, "metric": "loss", "phase": target, "at": at, "how": how})
    elif cls == NOISE:
        for q in phases.values():  # sub-rule accuracy dips
            k = int(rng.integers(3, len(q["evals"])))
            q["acc"][k] -= collapse_rule(sigma_e) * rng.uniform(0.0, 0.3)
    else:
        raise ValueError(f"unknown class {cls!r}")
    _distractors(rng, phases, s, info)
    rows, offsets = _rows(phases, info["truncate"])
    for lab in labels:
        lab["step"] = offsets[lab["phase"]] + lab.pop("at")
    return rows, labels, info


def _distractors(rng, phases: dict, s: float, info: dict) -> None:
    """Two sub-rule spikes per stream, away from the planted events."""
    for _ in range(2):
        name = str(rng.choice(list(phases)))
        q = phases[name]
        for _try in range(20):
            at = int(rng.integers(12, q["n"]))
            if all(not a <= at <= b for a, b in q["busy"]) and at not in q["nonfinite"]:
                size = spike_rule(s) * rng.uniform(0.3, 0.7)
                q["loss_override"][at] = size
                q["busy"].append((at - 3, at + 3))
                info["distractors"].append({"phase": name, "phase_step": at, "size": size})
                break


def _rows(phases: dict, truncate) -> tuple[list[dict], dict]:
    rows, offset, offsets = [], 0, {}
    for name, q in phases.items():
        offsets[name] = offset
        evals = dict(zip(q["evals"], np.clip(q["acc"] + q["acc_noise"], 0.0, 1.0), strict=True))
        stop = truncate[1] if truncate and truncate[0] == name else None
        for t in range(q["n"]):
            if t in evals:
                rows.append(_eval_row(offset + t, name, t, evals[t]))
            log_v = q["level"][t] + q["loss_override"].get(t, q["eps"][t])
            loss, finite = float(math.exp(log_v)), True
            bad = q["nonfinite"].get(t)
            if bad == "nan":
                loss, finite = math.nan, False
            elif bad == "inf":
                loss, finite = math.inf, False
            elif bad == "flag":
                finite = False
            rows.append(
                {
                    "kind": "train",
                    "step": offset + t,
                    "phase": name,
                    "phase_step": t,
                    "loss": loss,
                    "finite": finite,
                }
            )
            if stop is not None and t == stop:
                return rows, offsets
        rows.append(_eval_row(offset + q["n"], name, q["n"], evals[q["n"]]))
        offset += q["n"]
    return rows, offsets


def _eval_row(step: int, phase: str, phase_step: int, acc: float) -> dict:
    return {
        "kind": "eval",
        "step": step,
        "phase": phase,
        "phase_step": phase_step,
        "split": SPLIT,
        "loss": 1.0,
        "accuracy": float(acc),
        "n": 400,
    }


def stream_specs(set_name: str, seeds: int) -> list[dict]:
    """Every stream of a set: each family x noise level x class (and noise-only) x seed;
    the eval noise and interval cycle through the set's values."""
    params = SETS[set_name]
    specs, i = [], 0
    for fam in params["families"]:
        for s in params["s"]:
            for cls in (*CLASSES, NOISE):
                for seed in range(seeds):
                    specs.append(
                        {
                            "set": set_name,
                            "family": fam,
                            "s": s,
                            "sigma_e": params["sigma_e"][i % len(params["sigma_e"])],
                            "eval_every": params["eval_every"][i % len(params["eval_every"])],
                            "class": cls,
                            "seed": _seed(set_name, fam, s, cls, seed),
                        }
                    )
                    i += 1
    return specs


def _seed(*parts) -> int:
    """A stable seed from the stream's name (Python's hash() is salted per process)."""
    text = "/".join(map(str, parts)).encode()
    h = 0
    for b in text:
        h = (h * 131 + b) % (2**63)
    return h


# ----------------------------------------------------------------------------- scoring


def _group(metric: str) -> str:
    return "loss" if metric == "loss" else metric


def match(labels: list[dict], episodes: list[dict]) -> tuple[list[bool], list[bool]]:
    """(found per label, correct per episode): each label takes at most one episode, the
    first in logged order whose onset is within its tolerance."""
    found = [False] * len(labels)
    correct = [False] * len(episodes)
    for j, e in enumerate(episodes):
        for i, lab in enumerate(labels):
            if found[i] or _group(e["metric"]) != _group(lab["metric"]):
                continue
            before, after = tolerance(lab)
            if lab["step"] - before <= e["step"] <= lab["step"] + after:
                found[i] = correct[j] = True
                break
    return found, correct


def _kind_ok(cls: str, kind: str) -> bool:
    want = {
        "spike": ("spike",),
        "shift": ("rise",),
        "ramp": ("rise",),
        "collapse_sudden": ("fall",),
        "collapse_gradual": ("fall",),
        "nonfinite": ("nonfinite",),
    }[cls]
    return kind in want


def score_streams(streams, detect) -> dict:
    """Recall per class, precision, noise-only false alarms, onset errors of a detector.

    Args:
        streams: ``(spec, rows, labels)`` triples.
        detect: rows -> episodes (dicts with ``step``, ``metric``, ``kind``).
    """
    found = {c: [] for c in CLASSES}
    onset_err = {c: [] for c in CLASSES}
    kind_ok = {c: [] for c in CLASSES}
    severity = {c: [] for c in CLASSES}
    n_alarms = n_correct = 0
    noise_alarms = noise_steps = 0
    by_family: dict = {}
    for spec, rows, labels in streams:
        episodes = detect(rows)
        hits, correct = match(labels, episodes)
        n_alarms += len(episodes)
        n_correct += sum(correct)
        fam = by_family.setdefault(spec["family"], {"alarms": 0, "correct": 0, "n": 0, "f": 0})
        fam["alarms"] += len(episodes)
        fam["correct"] += sum(correct)
        fam["n"] += len(labels)
        fam["f"] += sum(hits)
        if spec["class"] == NOISE:
            noise_alarms += len(episodes)
            noise_steps += sum(r["kind"] == "train" for r in rows)
        for lab, hit in zip(labels, hits, strict=True):
            found[lab["class"]].append(hit)
            if not hit:
                continue
            e = next(
                e
                for e, c in zip(episodes, correct, strict=True)
                if c
                and _group(e["metric"]) == _group(lab["metric"])
                and lab["step"] - tolerance(lab)[0] <= e["step"] <= lab["step"] + tolerance(lab)[1]
            )
            onset_err[lab["class"]].append(e["step"] - lab["step"])
            kind_ok[lab["class"]].append(_kind_ok(lab["class"], e["kind"]))
            if "severity" in e:
                severity[lab["class"]].append(float(e["severity"]))
    out = {
        "streams": len(streams),
        "labelled_events": sum(len(v) for v in found.values()),
        "recall": {
            c: {"found": sum(v), "n": len(v), "recall": _ratio(sum(v), len(v))}
            for c, v in found.items()
        },
        "precision": {
            "alarms": n_alarms,
            "correct": n_correct,
            "precision": _ratio(n_correct, n_alarms),
        },
        "noise_only": {
            "alarms": noise_alarms,
            "train_steps": noise_steps,
            "false_alarms_per_1000_steps": _ratio(1000 * noise_alarms, noise_steps),
        },
        "onset_error_steps": {
            c: {
                "median": statistics.median(v),
                "min": min(v),
                "max": max(v),
            }
            for c, v in onset_err.items()
            if v
        },
        "kind_agreement": {c: _ratio(sum(v), len(v)) for c, v in kind_ok.items() if v},
        "by_family": {
            f: {
                "recall": _ratio(d["f"], d["n"]),
                "precision": _ratio(d["correct"], d["alarms"]),
                "alarms": d["alarms"],
            }
            for f, d in by_family.items()
        },
    }
    if any(severity.values()):
        out["severity_median"] = {c: statistics.median(v) for c, v in severity.items() if v}
    out["min_recall"] = min(r["recall"] for r in out["recall"].values() if r["n"])
    return out


def _ratio(a, b):
    return None if not b else round(a / b, 4)


def make_set(set_name: str, seeds: int) -> list[tuple[dict, list[dict], list[dict]]]:
    out = []
    for spec in stream_specs(set_name, seeds):
        rows, labels, _ = make_stream(spec)
        out.append((spec, rows, labels))
    return out


# ----------------------------------------------------------------------------- real curves


def load_labels(path: str) -> dict:
    """The hand labels file: ``{"rule": ..., "runs": {metrics path: [labels]}}``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise ValueError(f"{path}: expected an object with a 'runs' object")
    return data


def score_real(path: str, detect, read_rows) -> dict:
    """The detector on hand-labelled real runs (paths in the file relative to the cwd)."""
    data = load_labels(path)
    streams, per_run = [], {}
    for run, labels in data["runs"].items():
        rows = read_rows(run)
        spec = {"family": "real", "class": "real", "run": run}
        streams.append((spec, rows, labels))
        episodes = detect(rows)
        hits, correct = match(labels, episodes)
        per_run[run] = {
            "labels": [
                {"class": lab["class"], "metric": lab["metric"], "step": lab["step"], "found": h}
                for lab, h in zip(labels, hits, strict=True)
            ],
            "episodes": [
                {k: e.get(k) for k in ("step", "metric", "kind", "end_step", "severity")}
                | {"matches_a_label": c}
                for e, c in zip(episodes, correct, strict=True)
            ],
        }
    out = score_streams(streams, detect)
    out.pop("noise_only")
    out["runs"] = per_run
    return out


# ----------------------------------------------------------------------------- cost


def cost_per_row(detector_factory, rows: list[dict], repeats: int = 5) -> dict:
    """Microseconds per row fed to a fresh online detector (best of ``repeats``)."""
    best = math.inf
    for _ in range(repeats):
        det = detector_factory()
        t = time.perf_counter()
        for row in rows:
            det.update(row)
        best = min(best, time.perf_counter() - t)
    return {"rows": len(rows), "us_per_row": round(1e6 * best / len(rows), 3)}


# ----------------------------------------------------------------------------- CLI


def bench_detector(opts: dict) -> dict:
    """Scores ``jaxrepro.dropoff``'s default detector on every set (and the real labels)."""
    from jaxrepro import dropoff

    seeds = int(opts["seeds"])
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    names = [n for n in str(opts["sets"]).split(",") if n]
    for n in names:
        if n not in SETS:
            raise ValueError(f"unknown set {n!r}; known: {', '.join(SETS)}")
    if opts["record"] not in ("current", "baseline"):
        raise ValueError(f"record must be 'current' or 'baseline', got {opts['record']!r}")

    def detect(rows):
        return dropoff.detect(rows)

    result = {
        "detector": {
            "module": "jaxrepro.dropoff",
            "config": dropoff.default_config().to_dict(),
        },
        "sets": {},
    }
    long_rows = []
    for name in names:
        streams = make_set(name, seeds)
        result["sets"][name] = score_streams(streams, detect)
        if not long_rows:
            long_rows = [r for _, rows, _ in streams[:60] for r in rows]
    if opts["labels"] and os.path.exists(opts["labels"]):
        result["real"] = score_real(opts["labels"], detect, dropoff.read_metrics)
    result["cost"] = cost_per_row(dropoff.OnlineDetector, _renumber(long_rows))
    return result


def _renumber(rows: list[dict]) -> list[dict]:
    """Rows of many streams as one long run (steps increasing; phases alternate)."""
    out, step = [], 0
    last = None
    for r in rows:
        if last is not None and r["step"] != last:
            step += 1
        last = r["step"]
        out.append(dict(r, step=step))
    return out


def about() -> dict:
    """The benchmark's rule, tolerances and sets, as written into detector.json."""
    return {
        "rule": {
            "spike": f"one loss >= {SPIKE_RATIO}x the level and >= {SPIKE_Z} robust sd "
            "(log space) above it",
            "shift": f"level jumps and stays, by >= max(log {SHIFT_RATIO}, {SHIFT_Z} s)",
            "ramp": f"log level climbs over 20-80 steps by >= max(log {RAMP_RATIO}, {RAMP_Z} s)",
            "collapse": f"accuracy level falls by >= max({COLLAPSE_MIN}, {COLLAPSE_Z} sigma_e) "
            "and stays down (sudden: one eval; gradual: 3-6 evals)",
            "nonfinite": "NaN/Inf loss or finite=false (once, 2-5 rows, or the run's last row)",
        },
        "tolerance": TOLERANCE,
        "sets": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in SETS.items()},
        "noise_families": {"tuned": list(FAMILIES_TUNED), "held_out": list(FAMILIES_HELD_OUT)},
    }
