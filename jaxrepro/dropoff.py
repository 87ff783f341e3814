"""Online and offline drop-off detection over a run's metrics rows: episodes, not points.

A drop-off is an *episode* of one stream (the training loss of a phase, or one eval
split's accuracy of a phase): an onset (``step``), an end (``end_step``) and a peak
(``peak_step``, ``peak_after``), of one ``kind``. The thresholds are the rule of the
labelled benchmark (``jaxrepro bench detector``, jaxrepro/bench/detector.py), and
the loss is judged in log space: batch losses are right-skewed (a batch twice the level
is common on a noisy curve, one at half of it is not), their log is roughly symmetric.

* ``spike``: a train loss at least ``loss.min_ratio`` (4) times the baseline median and
  at least ``loss.z_threshold`` (5.5) robust sd above it (the rule's 5 sd plus a half
  for the error of an sd estimated from 30 points: at 5, noise batches of 4.5-5 true sd,
  common where hard batches are, were alarms); spikes within
  ``loss.refractory`` (10) judged points are one episode.
* ``rise``: a sustained rise, a level jump that stays or a gradual ramp to divergence,
  as one episode, opened by either of two tests of the *level*, the median of the newest
  ``loss.shift_points`` (9) losses:

  - against the *lowest past level*: the level is at least ``max(log
    loss.shift_ratio, loss.shift_z * sd)`` (1.5x and 2.5 robust sd) above the lowest
    level of the last ``loss.lookback`` (100) points that no longer overlaps the newest
    ones. The lowest, not the mean, because a training loss falls: a rise is judged
    against where the curve had got to (the rule's 2 sd plus half an sd for the downward
    bias of a minimum of noisy medians, most of it on left-skewed noise). A ramp, whose
    climb adds up, is found here.
  - against the *curve's trend*: the level is at least ``max(log loss.shift_ratio,
    loss.trend_z * sd)`` (3.5 sd) above the least-squares line of the
    ``loss.trend_window`` (30) non-spike points before the newest ones, extended to the
    newest points' middle; the sd is the larger of that of consecutive differences and
    the line's residual sd (neither is widened by the curve's fall or by the jump, whose
    points are not in the line; the second grows where losses wander together, as on
    real runs). On a steeply falling curve a
    jump is seen here before the curve's own fall takes it back under the first test's
    threshold (10-15 steps on the benchmark's fastest curves); the higher threshold pays
    for the extension's error where a curve flattens.
  - and at a non-finite loss, a climb of at least ``max(log loss.shift_ratio,
    loss.diverge_z * sd)`` (the rule's 2 sd) over the lowest past level: a ramp to
    divergence cut short by the NaN before it cleared 2.5 sd, the NaN being the evidence.

  A spike that turns out to be the first point of a rise becomes that rise. The episode
  ends when the level falls back below half the threshold above the reference; its peak
  is the highest level (not a batch).
* ``fall``: an eval accuracy at least ``accuracy.min_drop`` (0.2) below the best (or the
  median) of the last ``accuracy.window`` (10) evals of the phase and split, sudden or
  gradual; it ends at the first eval back within half of that of the reference; its
  peak is the lowest accuracy.
* ``nonfinite``: a NaN/Inf loss or accuracy, or a train row with ``finite: false``;
  consecutive ones (within ``nonfinite.refractory`` rows) are one episode.

**The baseline** of a loss stream is the median of its last ``loss.window`` (30) log
losses and the noise's robust sd (:meth:`OnlineDetector._sd`); spike points never enter
it, nor do the points of an open rise (a level that stays up is compared with the level
before it, however long it stays).

**Onsets** are where a replay should branch (from the last checkpoint before ``step``);
they are placed when the episode is confirmed and do not move, but for two cases: a
spike that turns out to be the first point of a rise takes the rise's onset when that is
earlier (a step or two), and a rise's onset is placed once more, ``loss.refine_after``
(20) points after its confirmation, if it is still open then. A spike's onset is its
step. A rise's is placed back from the row that confirmed it, over the last
``loss.lookback`` points (none before the end of an earlier rise of the phase), by a
least-squares change-point fit: a line (the curve's own trend, a falling loss before the
change) plus, from the onset on, a step (a level jump) or a hinge (a climb of constant
slope: a ramp), the onset and form that explain most of the squared deviation from the
line upward; the fit is made twice, the second time on the points pulled to within
``loss.onset_clip`` (2) robust sd of the first fit, so that a few heavy-tailed batches do
not move a ramp's hinge. Placed again, the fit runs over the same first point to a few
points past the highest level so far: more of a jump, and of a ramp's climb but not the top it
stays at, where the first fit saw only the points that cleared the threshold (a slow
climb in noise was placed 12-23 steps early or late from them). For a level jump that is
the jump's step; for a ramp, where its climb begins (results/bench/detector.json has
the errors). Until a rise's onset is placed again, :meth:`OnlineDetector.pending_from`
is the first point of its fit, so the engine keeps a checkpoint before any onset the
second fit can choose. A fall's onset is, over the
evals from the reference (the best of the window) to the one that confirmed it, the eval
where a downward step or hinge from a constant level explains most of the squared
deviation (a sudden fall: the confirming eval; a gradual one: its first lower eval,
which one noisy eval in the fall does not move). ``confirmed_step`` is the row that
opened the episode: the online delay. :meth:`OnlineDetector.pending_from` is the
earliest step a not yet confirmed episode could be placed at, so the engine keeps a
checkpoint before it.

**Phase starts**: histories reset at a phase change (a new head and a new data stream
make the past incomparable) and the first ``loss.transient_steps`` (10) steps of a
phase are not judged and do not enter the baseline: a new head and a fresh optimizer
make the loss jump 2-3x for steps 1-8 of both phases of the digits runs
(results/digits_aug), which is the phase's transient, not a drop-off. Non-finite values
are flagged there too. Then ``loss.min_history`` (20) baseline points are gathered
before anything is judged, so a loss is first judged at phase step 30 (logging every
step).

**Severity** (:func:`severity`), comparable across kinds: ``magnitude * persistence``.
The magnitude is the fraction of what the phase had learned that the episode gave back:
for the loss, the log rise of the peak over the baseline divided by the log fall from
the phase's first loss (before any update of the phase) to the baseline (at least
log 2); for an accuracy fall, the fall to the trough divided by the gain from the
phase's first eval to the reference (at least 0.1); capped at 2. The persistence of a
loss episode is its length in steps over ``severity.full_steps`` (20), capped at 1; an
accuracy fall is a state of the model, persistence 1. A non-finite episode has
severity 2 (the cap: the run's state is undefined there). So a collapse to chance
(magnitude ~1) outranks a one-batch spike to chance level (~1/20), and a sustained
rise outranks a spike of the same height.

The engine feeds every row it logs to an :class:`OnlineDetector`; :func:`detect` feeds
stored rows through the same code, so the final episode lists agree; an episode's
``end_step``, peak, kind (``spike`` -> ``rise``) and severity may still change after it
is first reported (its onset only as said above).

dropoffs.json stays a JSON list of event objects: the fields of the first format
(``step``, ``phase``, ``metric``, ``kind``, ``before``, ``after``, ``size``,
``end_step``, ``n_points``, ``peak_after``, ``peak_size``) keep their names, and
``version``, ``peak_step``, ``confirmed_step``, ``severity`` are added; events of the
first format (no ``version``) read back with their severity computed by
:func:`severity` from the fields they have.
"""

from __future__ import annotations

import bisect
import collections
import collections.abc
import json
import logging
import math
import numbers
import os
import tempfile

import ml_collections

DROPOFFS_FILE = "dropoffs.json"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 2
SPLITS = ("source_test", "target_test")
SEVERITY_CAP = 2.0
_MAD_SCALE = 1.4826  # MAD -> standard deviation for a normal distribution
_SQRT2 = math.sqrt(2.0)  # the difference of two independent points has sqrt(2) x their sd
_TINY = 1e-12  # losses are floored here before the log (a loss of 0 is not -inf)
_MIN_LEARNED_LOG = math.log(2.0)  # severity: the loss fall a phase is credited with at least
_MIN_LEARNED_ACC = 0.1  # severity: the accuracy gain a phase is credited with at least
_MIN_PRE = 5  # points before a rise's onset in its change-point fit (the line needs some)
log = logging.getLogger("jaxrepro")


def default_config() -> ml_collections.ConfigDict:
    """Thresholds of the detector, measured with ``jaxrepro bench detector``.

    The thresholds are the benchmark's rule (jaxrepro/bench/detector.py): a spike is
    >= 4x the level and >= 5 robust sd in log space (5.5 here: the sd is estimated from
    30 points), a sustained rise >= 1.5x and >= 2 robust sd (2.5 here against the lowest
    past level, a minimum of noisy medians, a little low; 3.5 against the curve's
    extended trend, whose error grows where a curve flattens; 2 before a non-finite
    loss), an accuracy collapse a fall of >= 0.2. On
    the digits default (batch 32) the log loss's robust sd is 0.25-0.5, so a spike there
    must be 4x-16x its level: a batch 2.5x the
    level is that curve's noise. The windows and onset rules were tuned on the
    benchmark's tuned set only (results/bench/detector.json has the held-out scores).

    Returns:
        A ConfigDict with ``loss``, ``accuracy``, ``nonfinite`` and ``severity`` sections.
    """
    c = ml_collections.ConfigDict()
    c.loss = ml_collections.ConfigDict()
    c.loss.window = 30  # log losses in the baseline
    c.loss.min_history = 20  # baseline points needed before anything is judged
    c.loss.transient_steps = 10  # first phase steps not judged (new head, fresh optimizer)
    c.loss.z_threshold = 5.5  # spike: robust sd above the baseline, log space (rule: 5)
    c.loss.min_ratio = 4.0  # spike: value / baseline median
    c.loss.noise_window = 100  # consecutive differences giving the noise's sd
    c.loss.mad_floor = 0.02  # robust sd >= this (log space: 2%), a flat curve has MAD 0
    c.loss.shift_points = 9  # rise: the median of this many newest points ...
    c.loss.shift_ratio = 1.5  # ... is >= this times the baseline median
    c.loss.shift_z = 2.5  # ... and >= this many robust sd above it (log space)
    c.loss.lookback = 100  # points searched back for a rise's onset
    c.loss.trend_window = 30  # rise (a jump): points of the line before the newest ones ...
    c.loss.trend_z = 3.5  # ... the newest level >= this many noise sd above its extension
    c.loss.refine_after = 20  # points after its confirmation a rise's onset is placed again
    c.loss.diverge_z = 2.0  # a climb of >= this many sd before a non-finite loss is a rise
    c.loss.onset_clip = 2.0  # onset fit: points pulled to this many sd of a first fit (0: off)
    c.loss.refractory = 10  # logged points within which spikes merge into one episode
    c.accuracy = ml_collections.ConfigDict()
    c.accuracy.window = 10  # previous evals of the same phase and split
    c.accuracy.min_history = 1
    c.accuracy.min_drop = 0.20  # absolute fall, accuracy in [0, 1]
    c.accuracy.reference = "max"  # or 'median' of the window
    c.accuracy.refractory = 2  # evals within which falls merge into one episode
    c.nonfinite = ml_collections.ConfigDict()
    c.nonfinite.enabled = True
    c.nonfinite.refractory = 10  # consecutive NaN rows are one event
    c.severity = ml_collections.ConfigDict()
    c.severity.full_steps = 20  # a loss episode this long (steps) counts in full
    return c


def validate_config(cfg) -> None:
    """Raises ValueError naming the first impossible threshold in ``cfg`` (its field first)."""
    for section in ("loss", "accuracy", "nonfinite"):
        if section not in cfg:
            raise ValueError(f"{section}: section missing from the drop-off config")
    lo, acc = cfg["loss"], cfg["accuracy"]
    _check(lo, "loss", "window", lambda v: v >= 3, ">= 3")
    _check(
        lo,
        "loss",
        "min_history",
        lambda v: 1 <= v <= lo["window"],
        f"in [1, loss.window={lo['window']}]",
    )
    _check(lo, "loss", "noise_window", lambda v: v >= 3, ">= 3")
    _check(lo, "loss", "transient_steps", lambda v: v >= 0, ">= 0")
    _check(lo, "loss", "z_threshold", lambda v: v > 0, "> 0")
    _check(lo, "loss", "min_ratio", lambda v: v >= 1, ">= 1 (a ratio below 1 is not a rise)")
    _check(lo, "loss", "mad_floor", lambda v: v > 0, "> 0")
    _check(lo, "loss", "shift_points", lambda v: v >= 1, ">= 1")
    _check(lo, "loss", "shift_ratio", lambda v: v > 1, "> 1 (a ratio of 1 or less is not a rise)")
    _check(lo, "loss", "shift_z", lambda v: v > 0, "> 0")
    _check(
        lo,
        "loss",
        "trend_window",
        lambda v: v >= max(3, lo["min_history"]),
        f">= max(3, loss.min_history={lo['min_history']})",
    )
    _check(lo, "loss", "trend_z", lambda v: v > 0, "> 0")
    _check(lo, "loss", "refine_after", lambda v: v >= 0, ">= 0 (0: the onset is placed once)")
    _check(lo, "loss", "diverge_z", lambda v: v > 0, "> 0")
    _check(lo, "loss", "onset_clip", lambda v: v >= 0, ">= 0 (0: plain least squares)")
    _check(
        lo,
        "loss",
        "lookback",
        lambda v: v >= lo["shift_points"],
        f">= loss.shift_points={lo['shift_points']}",
    )
    _check(acc, "accuracy", "window", lambda v: v >= 1, ">= 1")
    _check(
        acc,
        "accuracy",
        "min_history",
        lambda v: 1 <= v <= acc["window"],
        f"in [1, accuracy.window={acc['window']}]",
    )
    _check(acc, "accuracy", "min_drop", lambda v: 0 < v <= 1, "in (0, 1]")
    if acc["reference"] not in ("max", "median"):
        raise ValueError(f"accuracy.reference must be 'max' or 'median', got {acc['reference']!r}")
    for name in ("loss", "accuracy", "nonfinite"):
        _check(cfg[name], name, "refractory", lambda v: v >= 0, ">= 0")
    if "severity" in cfg:
        _check(cfg["severity"], "severity", "full_steps", lambda v: v >= 1, ">= 1")


def _check(section, name: str, field: str, ok, want: str) -> None:
    if field not in section:
        raise ValueError(f"{name}.{field}: missing from the drop-off config")
    v = section[field]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name}.{field} must be a finite number, got {v!r}")
    if not ok(v):
        raise ValueError(f"{name}.{field} must be {want}, got {v}")


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _as_float(x) -> float:
    """The value as a JSON-safe float (NaN for None or a non-number)."""
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else math.nan


def _median(values) -> float:
    """The median of a few floats, as ``np.median`` computes it (the mean of the two middle
    values for an even count), in plain Python: the detector runs on every train row of
    the loop, where numpy's per-call overhead was most of its cost."""
    s = sorted(values)
    h = len(s) // 2
    return s[h] if len(s) % 2 else (s[h - 1] + s[h]) / 2


def _sorted_median(s: list) -> float:
    h = len(s) // 2
    return s[h] if len(s) % 2 else (s[h - 1] + s[h]) / 2


def _mad(s: list, m: float) -> float:
    """The median absolute deviation from ``m`` of the sorted list ``s``, walking out from
    ``m`` (the smallest deviations are a contiguous run of ``s`` around it)."""
    n = len(s)
    hi = bisect.bisect_left(s, m)
    lo = hi - 1
    d_prev = d = 0.0
    for _ in range(n // 2 + 1):  # deviations in increasing order, up to the middle one
        d_prev = d
        if lo < 0 or (hi < n and s[hi] - m <= m - s[lo]):
            d = s[hi] - m
            hi += 1
        else:
            d = m - s[lo]
            lo -= 1
    return d if n % 2 else (d_prev + d) / 2


def severity(event: dict) -> float:
    """How bad an episode is, comparable across kinds (module docstring): 0 .. 2.

    Uses the event's ``severity`` when it has one; computes it from the fields of the
    first dropoffs.json format otherwise, where the phase's first loss and accuracy are
    unknown: a loss rise is measured against the floor (log 2), an accuracy fall against
    the accuracy before it (as if the phase had started at 0).
    """
    if "severity" in event and _finite(event["severity"]):
        return float(event["severity"])
    if event.get("kind") == "nonfinite":
        return SEVERITY_CAP
    before = _as_float(event.get("before"))
    peak = _as_float(event.get("peak_after", event.get("after")))
    if not (math.isfinite(before) and math.isfinite(peak)):
        return 0.0
    if str(event.get("metric", "")).startswith("accuracy"):  # the phase's start taken as 0
        return min(SEVERITY_CAP, max(0.0, before - peak) / max(before, _MIN_LEARNED_ACC))
    if before <= 0 or peak <= 0:
        return 0.0
    mag = min(SEVERITY_CAP, max(0.0, math.log(peak / before)) / _MIN_LEARNED_LOG)
    steps = int(event.get("end_step", event["step"])) - int(event["step"]) + 1
    return mag * min(1.0, steps / 20)


class _LossStream:
    """Baseline, recent points and the open episodes of a phase's training loss."""

    __slots__ = (
        "base",
        "base_sorted",
        "diffs",
        "diffs_sorted",
        "recent",
        "kmeds",
        "mins",
        "hist",
        "m",
        "sd",
        "first",
        "rise",
        "spike",
        "n",
        "floor_from",
        "nonfinite",
        "rows",
        "newest",
        "trend",
        "tsum",
    )

    def __init__(self, cfg):
        self.base = collections.deque()  # the baseline's log losses, oldest first
        self.base_sorted = []  # the same, sorted
        # |differences| of consecutive baseline points, for the noise's sd: unlike the
        # spread of the points themselves, a falling curve does not widen them.
        self.diffs = collections.deque()
        self.diffs_sorted = []
        self.recent = collections.deque(maxlen=cfg.shift_points)  # newest log losses
        # Medians of shift_points consecutive points: (point number, median), waiting
        # until they no longer overlap the newest ones, then in ``mins``, a monotonic
        # queue whose front is the lowest of the last ``lookback`` points' medians.
        self.kmeds = collections.deque()
        self.mins = collections.deque()
        # (row index, step, phase_step, x, x - the baseline median then (None: none yet))
        self.hist = collections.deque(maxlen=cfg.lookback + cfg.refine_after)
        self.m = self.sd = None  # median, robust sd of the baseline, while it is unchanged
        self.first = None  # log of the phase's first finite loss
        self.rise = None  # the open rise: {"event", "ref", "thr", "peak"}
        self.spike = None  # (point number, episode) of the last spike
        self.n = 0  # judged points
        self.floor_from = 0  # hist entries before this step are not searched for onsets
        self.nonfinite = None  # (row number, episode) of the last non-finite episode
        self.rows = 0  # train rows of the phase, finite or not
        # The trend test's points: the newest shift_points (point number, x, a spike?),
        # then, once older, the non-spike ones in ``trend`` (point number, x), the line's
        # points, with their sums (i, i*i, x, i*x, x*x) kept as they come and go.
        self.newest = collections.deque()
        self.trend = collections.deque()
        self.tsum = [0.0, 0.0, 0.0, 0.0, 0.0]


class _AccStream:
    """Recent evals, the reference and the open fall of a phase's split accuracy."""

    __slots__ = ("values", "first", "fall", "n", "last_fall", "nonfinite", "rows")

    def __init__(self, window: int):
        self.values = collections.deque(maxlen=window)  # (row index, step, phase_step, acc)
        self.first = None
        self.fall = None  # the open fall episode
        self.n = 0  # evals seen
        self.last_fall = None  # (eval number at its end, episode)
        self.nonfinite = None
        self.rows = 0  # eval rows of the phase and split, finite or not


class OnlineDetector:
    """Feeds metrics rows in order; reports drop-off episodes as they are confirmed."""

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        """Makes a detector.

        Args:
            cfg: thresholds, as from :func:`default_config` (the default when None), or
                the same as a plain dict (e.g. read back from config.json). Sections or
                fields it lacks (a config of the first detector) take the defaults.
        """
        full = default_config().to_dict()
        given = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg or {}
        if not isinstance(given, collections.abc.Mapping):
            raise ValueError(f"a drop-off config must be a mapping, got {type(cfg).__name__}")
        for section, fields in given.items():
            if isinstance(fields, collections.abc.Mapping) and section in full:
                full[section].update(fields)
            else:
                full[section] = fields
        validate_config(full)
        self.cfg = ml_collections.ConfigDict(full)
        self._lo = _Namespace(full["loss"])
        self._acc = _Namespace(full["accuracy"])
        self._nonfinite = _Namespace(full["nonfinite"])
        self._full_steps = full.get("severity", {}).get("full_steps", 20)
        self._log_ratio = math.log(self._lo.min_ratio)
        self._log_shift = math.log(self._lo.shift_ratio)
        self._events: list[dict] = []
        self._phase = None
        self._loss: _LossStream | None = None
        self._accs: dict[str, _AccStream] = {}
        self._index = -1
        self._last_step = None

    @property
    def events(self) -> list[dict]:
        """All episodes so far, in the order they were confirmed (updated in place)."""
        return self._events

    def pending_from(self) -> int | None:
        """The earliest step a not yet confirmed episode could get as its onset (None:
        none could): the engine keeps the checkpoint before it."""
        out = None
        st = self._loss
        if st is not None and st.rise is not None and st.rise["refine"] is not None:
            out = st.rise["from"]  # its onset is placed again, no earlier than this
        elif st is not None and st.rise is None and st.hist:
            i = self._first_searched(st)
            if i < len(st.hist):
                out = st.hist[i][1]
        for acc in self._accs.values():
            if acc.fall is None and acc.values:
                pos = _ref_position(acc.values) if self._acc.reference == "max" else -1
                if pos + 1 < len(acc.values):
                    step = acc.values[pos + 1][1]
                    out = step if out is None else min(out, step)
        return out

    def update(self, row: dict) -> list[dict]:
        """Judges one metrics row against the past of its phase.

        Args:
            row: a train or eval row of metrics.jsonl (other kinds are counted, ignored).

        Returns:
            The episodes this row confirmed (empty when it was quiet or extended one).

        Raises:
            ValueError: for a row that is not a dict, lacks a field the detector reads, or
                comes before the previous row's step (rows must be in step order).
        """
        if type(row) is not dict and not isinstance(row, dict):
            raise ValueError(
                f"metrics row {self._index + 1} must be a dict, got {type(row).__name__}"
            )
        self._index += 1
        kind = row.get("kind")
        if kind != "train" and kind != "eval":
            return []
        try:
            step, phase = row["step"], row["phase"]
        except KeyError as e:
            raise ValueError(f"metrics row {self._index} ({kind}) lacks {e.args[0]!r}") from None
        last = self._last_step
        if last is not None and step < last:
            raise ValueError(
                f"metrics row {self._index} ({kind}, step {step}) comes after a row of step "
                f"{last}: rows must be in step order"
            )
        self._last_step = step
        if phase != self._phase:
            self._phase, self._loss, self._accs = phase, _LossStream(self._lo), {}
        if kind == "train":
            return self._update_train(row)
        return self._update_eval(row)

    # -- the loss
    def _update_train(self, row: dict) -> list[dict]:
        """The hot path (every logged step): plain Python, few calls."""
        lo, st = self._lo, self._loss
        try:
            value = row["loss"]
        except KeyError:
            raise ValueError(f"train row {self._index} (step {row['step']}) lacks 'loss'") from None
        st.rows += 1
        finite = value - value == 0.0 if type(value) is float else _finite(value)
        if not finite or row.get("finite", True) is False:
            return self._diverged(st, row) + self._nonfinite_row(row, "loss", _as_float(value), st)
        x = math.log(value) if value > _TINY else math.log(_TINY)
        if st.first is None:
            st.first = x
        phase_step = row.get("phase_step")
        if phase_step is not None and phase_step < lo.transient_steps:
            return []
        st.n += 1
        # The median of the newest shift_points points, and the lowest of such medians
        # over the last lookback points that no longer overlap the newest ones (``ref``).
        recent = st.recent
        recent.append(x)
        level = ref = None
        if len(recent) == lo.shift_points:
            level = _median(recent)
            kmeds, mins = st.kmeds, st.mins
            kmeds.append((st.n, level))
            if len(kmeds) > lo.shift_points:
                item = kmeds.popleft()
                while mins and mins[-1][1] >= item[1]:
                    mins.pop()
                mins.append(item)
            if mins:
                if mins[0][0] <= st.n - lo.lookback:
                    mins.popleft()
                if mins:
                    ref = mins[0][1]
        events, admit = [], st.rise is None
        if len(st.base) < lo.min_history:
            st.hist.append((self._index, row["step"], phase_step, x, None))
        elif st.rise is not None:
            st.hist.append((self._index, row["step"], phase_step, x, None))
            self._extend_rise(st, row, level)
        else:
            m = st.m
            if m is None:
                m = _base_median(st)
            excess = x - m
            st.hist.append((self._index, row["step"], phase_step, x, excess))
            if excess >= self._log_ratio and excess >= lo.z_threshold * self._sd(st):
                admit = False
                events = self._spike(st, row, x, m)
            if ref is not None and level - ref >= self._log_shift:
                thr = max(self._log_shift, lo.shift_z * self._sd(st))
                if level - ref >= thr:
                    admit = False
                    events += self._open_rise(st, row, level, ref, thr)
            if admit and level is not None:
                events += self._trend_rise(st, row, level)
                admit = st.rise is None
        self._push_trend(st, x, not admit)
        if admit:  # into the baseline (spikes and the points of a rise stay out of it)
            base = st.base
            if base:
                d = x - base[-1]
                d = -d if d < 0 else d
                st.diffs.append(d)
                bisect.insort(st.diffs_sorted, d)
                if len(st.diffs) > lo.noise_window:
                    del st.diffs_sorted[bisect.bisect_left(st.diffs_sorted, st.diffs.popleft())]
            base.append(x)
            bisect.insort(st.base_sorted, x)
            if len(base) > lo.window:
                del st.base_sorted[bisect.bisect_left(st.base_sorted, base.popleft())]
            st.m = st.sd = None
        return events

    def _trend_rise(self, st: _LossStream, row: dict, level: float) -> list[dict]:
        """A level jump, judged against the curve's own trend: the least-squares line of
        the ``loss.trend_window`` non-spike points before the newest ``shift_points``,
        extended to the newest points' middle. Opens a rise when their level is at least
        ``max(log shift_ratio, trend_z * sd)`` above it, the sd the larger of that of
        consecutive differences and the line's residual sd (neither the curve's fall nor
        the jump widens them). On a steeply falling curve a jump is seen here before the
        fall takes it back under the lowest past level."""
        trend = st.trend
        c = len(trend)
        if c < self._lo.min_history or c < 3:  # a line and a residual sd need 3 points
            return []
        si, sii, sy, siy, syy = st.tsum
        vi = sii - si * si / c
        if vi <= 0:
            return []
        cov = siy - si * sy / c
        slope = cov / vi
        mid = st.n - (self._lo.shift_points - 1) / 2
        ref = sy / c + slope * (mid - si / c)
        if level - ref < self._log_shift:
            return []
        rss = (syy - sy * sy / c) - cov * cov / vi  # the line's residuals: a wander's spread
        sd = max(_step_sd(st), math.sqrt(max(rss, 0.0) / (c - 2)), self._lo.mad_floor)
        thr = max(self._log_shift, self._lo.trend_z * sd)
        if level - ref < thr:
            return []
        return self._open_rise(st, row, level, ref, thr)

    def _push_trend(self, st: _LossStream, x: float, out: bool) -> None:
        """The point joins the newest ones; the oldest of them moves to the trend line's
        points (not a spike's). A rise empties both: the line is drawn again after it."""
        if st.rise is not None:
            if st.trend or st.newest:
                st.trend.clear()
                st.newest.clear()
                st.tsum[:] = [0.0, 0.0, 0.0, 0.0, 0.0]
            return
        newest = st.newest
        newest.append((st.n, x, out))
        if len(newest) <= self._lo.shift_points:
            return
        i, y, spike = newest.popleft()
        if spike:
            return
        t = st.tsum
        st.trend.append((i, y))
        t[0] += i
        t[1] += i * i
        t[2] += y
        t[3] += i * y
        t[4] += y * y
        if len(st.trend) > self._lo.trend_window:
            i, y = st.trend.popleft()
            t[0] -= i
            t[1] -= i * i
            t[2] -= y
            t[3] -= i * y
            t[4] -= y * y

    def _diverged(self, st: _LossStream, row: dict) -> list[dict]:
        """A non-finite loss after a climb: the climb is a rise (a ramp to divergence),
        at the rule's own threshold (``max(log shift_ratio, diverge_z * sd)`` over the
        lowest past level), the non-finite value being the evidence that it was one."""
        lo = self._lo
        if st.rise is not None or len(st.recent) < lo.shift_points or not st.mins:
            return []
        if len(st.base) < lo.min_history:
            return []
        level, ref = _median(st.recent), st.mins[0][1]
        if st.m is None:
            _base_median(st)
        thr = max(self._log_shift, lo.diverge_z * self._sd(st))
        if level - ref < thr:
            return []
        return self._open_rise(st, row, level, ref, thr)

    def _sd(self, st: _LossStream) -> float:
        """The noise's robust sd (log space), computed when a test needs it: the larger of
        1.4826 x the baseline's MAD and 1.4826 x the median |difference| of consecutive
        baseline points / sqrt(2) (over ``loss.noise_window``), floored at
        ``loss.mad_floor``. The second is steadier (a longer window, which a falling curve
        does not widen); the first is larger where the batch losses wander together
        (consecutive losses of a real run are not independent)."""
        if st.sd is None:
            spread = _mad(st.base_sorted, st.m)
            st.sd = max(_step_sd(st), _MAD_SCALE * spread, self._lo.mad_floor)
        return st.sd

    def _spike(self, st: _LossStream, row: dict, x: float, m: float) -> list[dict]:
        last = st.spike
        if last is not None and st.n - last[0] <= self._lo.refractory:
            event = last[1]
            event["end_step"] = int(row["step"])
            event["n_points"] += 1
            if x > math.log(event["peak_after"]):
                self._set_peak(event, row["step"], math.exp(x), math.exp(x - m))
            st.spike = (st.n, event)
            self._loss_severity(event, st, m)
            return []
        event = self._new_event(
            self._index, row, "loss", "spike", math.exp(m), math.exp(x), math.exp(x - m)
        )
        st.spike = (st.n, event)
        self._loss_severity(event, st, m)
        return [event]

    def _open_rise(self, st: _LossStream, row: dict, level: float, ref: float, thr: float):
        """A sustained rise confirmed at this row: place its onset, open (or upgrade) it."""
        index, step, phase_step, x = self._onset(st)
        last = st.spike
        new = []
        if last is not None and last[1]["end_step"] >= step - 2:
            event = last[1]  # the spike was the rise's first point (or in it): one episode
            event["kind"] = "rise"
            if step < event["step"]:  # the rise began a step or two before the spike
                event.update(index=index, step=step, phase_step=phase_step, after=math.exp(x))
                event["size"] = event["after"] / event["before"]
        else:
            event = self._new_event(
                index, {**row, "step": step, "phase_step": phase_step}, "loss", "rise",
                math.exp(ref), math.exp(x), math.exp(x - ref),
            )  # fmt: skip
            new = [event]
        event["end_step"] = int(row["step"])
        event["n_points"] = max(event["n_points"], int(row["step"]) - event["step"] + 1)
        self._set_peak(event, row["step"], math.exp(level), math.exp(level - ref))
        hist = st.hist
        st.rise = {
            "event": event,
            "ref": ref,
            "thr": thr,
            "peak": level,
            "peak_step": int(row["step"]),
            # the onset is placed again refine_after points on, over the same points
            "from": hist[max(0, len(hist) - self._lo.lookback)][1],
            "refine": st.n + self._lo.refine_after if self._lo.refine_after else None,
        }
        self._loss_severity(event, st, ref)
        return new

    def _extend_rise(self, st: _LossStream, row: dict, level: float) -> None:
        rise = st.rise
        event, ref, thr = rise["event"], rise["ref"], rise["thr"]
        if level - ref < thr / 2:  # back near the level before it: the episode is over
            st.rise = st.spike = None
            st.floor_from = int(row["step"])
            return
        event["end_step"] = int(row["step"])
        event["n_points"] += 1
        if level > rise["peak"]:
            rise["peak"] = level
            rise["peak_step"] = int(row["step"])
            self._set_peak(event, row["step"], math.exp(level), math.exp(level - ref))
        if rise["refine"] is not None and st.n >= rise["refine"]:
            rise["refine"] = None
            self._replace_onset(st, event, rise)
        self._loss_severity(event, st, ref)

    def _onset(self, st: _LossStream):
        """Where the rise confirmed now began: a change-point fit over the points searched
        (the last ``loss.lookback``, none before the end of an earlier rise).

        The log losses are fitted by a line (the curve's own trend before the change)
        plus, from a candidate point ``t`` on, either a step (a level jump) or a hinge
        (a slope that starts at ``t``, already one unit up at ``t``: a ramp); the onset
        is the ``t`` and form whose upward change explains most of the squared deviation
        from the line (least squares, closed form from prefix sums, O(points)). The line takes the
        falling curve before the change into account, and the hinge places a ramp's
        onset where its climb begins, not where it clears the noise.
        """
        return _change_point(st.hist, self._first_searched(st), _MIN_PRE, self._lo.onset_clip)[:4]

    def _first_searched(self, st: _LossStream) -> int:
        """Index in ``st.hist`` of the first point a rise's onset fit searches: the last
        ``loss.lookback`` points, none before the end of an earlier rise of the phase."""
        hist = st.hist
        i = max(0, len(hist) - self._lo.lookback)
        while i < len(hist) and hist[i][1] < st.floor_from:
            i += 1
        return i

    def _replace_onset(self, st: _LossStream, event: dict, rise: dict) -> None:
        """The rise's onset placed again, ``loss.refine_after`` points after it was
        confirmed: the same change-point fit over the points searched then, up to a few
        points past the highest level so far (a ramp's climb, not the top it stays at),
        now with more of the climb seen."""
        pts = [h for h in st.hist if h[1] >= max(rise["from"], st.floor_from)]
        end = 0
        while end < len(pts) and pts[end][1] <= rise["peak_step"]:
            end += 1
        pts = pts[: end + (self._lo.shift_points - 1) // 2]
        if len(pts) <= _MIN_PRE + 1:
            return
        index, step, phase_step, x = _change_point(pts, 0, _MIN_PRE, self._lo.onset_clip)[:4]
        event.update(index=index, step=step, phase_step=phase_step, after=math.exp(x))
        event["size"] = event["after"] / event["before"]
        event["n_points"] = int(event["end_step"]) - step + 1
        self._loss_severity(event, st, rise["ref"])

    def _loss_severity(self, event: dict, st: _LossStream, m: float) -> None:
        learned = max((st.first if st.first is not None else m) - m, _MIN_LEARNED_LOG)
        mag = min(SEVERITY_CAP, max(0.0, math.log(event["peak_after"]) - m) / learned)
        steps = event["end_step"] - event["step"] + 1
        event["severity"] = round(mag * min(1.0, steps / self._full_steps), 6)

    # -- eval accuracy
    def _update_eval(self, row: dict) -> list[dict]:
        acc = self._acc
        split = row.get("split")
        if split is None:
            raise ValueError(f"eval row {self._index} lacks 'split'")
        if "accuracy" not in row:
            raise ValueError(f"eval row {self._index} (step {row['step']}) lacks 'accuracy'")
        metric = f"accuracy/{split}"
        if split not in self._accs:
            self._accs[split] = _AccStream(acc.window)
        st = self._accs[split]
        st.rows += 1
        value = row["accuracy"]
        if not _finite(value) or not _finite(row.get("loss", 0.0)):
            return self._nonfinite_row(row, metric, _as_float(value), st)
        value = float(value)
        st.n += 1
        if st.first is None:
            st.first = value
        if st.fall is not None:
            fall = st.fall
            ref = fall["before"]
            if ref - value >= acc.min_drop / 2:
                fall["end_step"] = int(row["step"])
                fall["n_points"] += 1
                if value < fall["peak_after"]:
                    self._set_peak(fall, row["step"], value, ref - value)
                    self._acc_severity(fall, st)
                st.last_fall = (st.n, fall)
                return []
            st.fall = None  # recovered
        events = []
        if len(st.values) >= acc.min_history:
            if acc.reference == "max":
                ref = max(v[3] for v in st.values)
            else:
                ref = _median([v[3] for v in st.values])
            if ref - value >= acc.min_drop:
                events = self._open_fall(st, row, metric, ref, value)
        if st.fall is None:
            st.values.append((self._index, row["step"], row.get("phase_step"), value))
        return events

    def _open_fall(self, st: _AccStream, row, metric, ref, value) -> list[dict]:
        acc = self._acc
        values = list(st.values)
        pos = _ref_position(values) if acc.reference == "max" else 0
        onset = _fall_onset(
            [*values[pos:], (self._index, row["step"], row.get("phase_step"), value)]
        )
        last = st.last_fall
        if last is not None and st.n - last[0] <= acc.refractory:
            event, new = last[1], []
            if value < event["peak_after"]:
                self._set_peak(event, row["step"], value, event["before"] - value)
        else:
            index, step, phase_step, after = onset
            event = self._new_event(
                index, {**row, "step": step, "phase_step": phase_step}, metric, "fall",
                ref, after, ref - after,
            )  # fmt: skip
            if value < after:
                self._set_peak(event, row["step"], value, ref - value)
            new = [event]
        event["end_step"] = int(row["step"])
        event["n_points"] += 0 if new else 1
        st.fall = event
        st.last_fall = (st.n, event)
        self._acc_severity(event, st)
        return new

    def _acc_severity(self, event: dict, st: _AccStream) -> None:
        learned = max(
            event["before"] - (st.first if st.first is not None else 0.0), _MIN_LEARNED_ACC
        )
        mag = min(SEVERITY_CAP, max(0.0, event["before"] - event["peak_after"]) / learned)
        event["severity"] = round(mag, 6)

    # -- non-finite values
    def _nonfinite_row(self, row: dict, metric: str, after: float, st) -> list[dict]:
        """A non-finite value: a new episode, or the open one's next row (within the
        refractory rows of the same stream)."""
        if not self._nonfinite.enabled:
            return []
        last = st.nonfinite
        if last is not None and st.rows - last[0] <= self._nonfinite.refractory:
            event = last[1]
            event["end_step"] = int(row["step"])
            event["n_points"] += 1
            st.nonfinite = (st.rows, event)
            return []
        event = self._new_event(self._index, row, metric, "nonfinite", math.nan, after, math.nan)
        event["severity"] = SEVERITY_CAP
        st.nonfinite = (st.rows, event)
        return [event]

    # -- episodes
    def _new_event(self, index, row, metric, kind, before, after, size) -> dict:
        event = {
            "version": FORMAT_VERSION,
            "index": index,
            "step": int(row["step"]),
            "phase": row["phase"],
            "phase_step": row.get("phase_step"),
            "metric": metric,
            "kind": kind,
            "before": before,
            "after": after,
            "size": size,
            "end_step": int(row["step"]),
            "n_points": 1,
            "peak_step": int(row["step"]),
            "peak_after": after,
            "peak_size": size,
            "confirmed_step": int(self._last_step),
            "severity": 0.0,
        }
        self._events.append(event)
        return event

    @staticmethod
    def _set_peak(event: dict, step, after: float, size: float) -> None:
        event["peak_step"], event["peak_after"], event["peak_size"] = int(step), after, size


class _Namespace:
    """A section of the config as plain attributes: read on every train row."""

    def __init__(self, d):
        self.__dict__.update(d)


def _step_sd(st: _LossStream) -> float:
    """The noise's sd from consecutive differences of baseline points (1.4826 x their
    median |difference| / sqrt(2)): neither a falling curve nor one jump widens it."""
    med = _sorted_median(st.diffs_sorted) if st.diffs_sorted else 0.0
    return _MAD_SCALE * med / _SQRT2


def _base_median(st: _LossStream) -> float:
    """The baseline's median, kept in ``st.m`` until the baseline changes."""
    b = st.base_sorted
    h = len(b) // 2
    st.m = b[h] if len(b) % 2 else (b[h - 1] + b[h]) / 2
    return st.m


def _ref_position(values) -> int:
    """Position in ``values`` of the (last) highest accuracy."""
    best, pos = -math.inf, 0
    for i, v in enumerate(values):
        if v[3] >= best:
            best, pos = v[3], i
    return pos


def _change_point(hist, first: int, min_pre: int, clip: float = 0.0):
    """The entry of ``hist[first:]`` (tuples whose [3] is a log loss) where an upward
    step or hinge over a fitted line explains most of the squared deviation from the
    line (:meth:`OnlineDetector._onset`); candidates leave ``min_pre`` points before.

    With ``clip`` > 0 the fit is made twice: the second time on the points pulled to
    within ``clip`` robust sd (1.4826 x the MAD of the first fit's residuals) of the
    first fit, so that a few heavy-tailed batches do not move a ramp's hinge."""
    ys = [hist[i][3] for i in range(first, len(hist))]
    n = len(ys)
    if n <= min_pre + 1:
        return hist[first] if n else hist[-1]
    pick, fitted = _fit_change_point(ys, min_pre)
    if clip > 0 and fitted is not None:
        res = sorted(abs(y - f) for y, f in zip(ys, fitted, strict=True))
        lim = clip * _MAD_SCALE * _sorted_median(res)
        if lim > 0:
            ys = [f + max(-lim, min(lim, y - f)) for y, f in zip(ys, fitted, strict=True)]
            pick = _fit_change_point(ys, min_pre)[0]
    return hist[first + pick]


def _fit_change_point(ys: list, min_pre: int):
    """(position, fitted values) of the best upward step or hinge over a line, least
    squares, closed form from prefix sums (O(points)); fitted is None without one."""
    n = len(ys)
    # The line: least squares of y on (1, i).
    si = n * (n - 1) / 2
    sii = (n - 1) * n * (2 * n - 1) / 6
    det = n * sii - si * si
    sy = sum(ys)
    siy = 0.0
    for i, y in enumerate(ys):
        siy += i * y
    b0 = (n * siy - si * sy) / det
    a0 = (sy - b0 * si) / n
    # Suffix sums of y and i*y: the regressor z of a candidate is 0 before t.
    suf_y, suf_iy = [0.0] * (n + 1), [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suf_y[i] = suf_y[i + 1] + ys[i]
        suf_iy[i] = suf_iy[i + 1] + i * ys[i]
    best, pick, how = 0.0, n - 1, None
    for t in range(min_pre, n):
        m = n - t
        # (sum z, sum z^2, sum i z, sum z y) of the step (z = 1) and the hinge (z = i - t + 1)
        sz_h = m * (m + 1) / 2
        szz_h = m * (m + 1) * (2 * m + 1) / 6
        for hinge, (sz, szz, siz, szy) in enumerate(
            (
                (m, m, (t + n - 1) * m / 2, suf_y[t]),
                (sz_h, szz_h, szz_h + (t - 1) * sz_h, suf_iy[t] - (t - 1) * suf_y[t]),
            )
        ):
            zy = szy - a0 * sz - b0 * siz  # z . (y - line)
            if zy <= 0:
                continue  # a fall, not a rise
            zz = szz - (sii * sz * sz - 2 * si * sz * siz + n * siz * siz) / det
            if zz > 1e-12 and zy * zy / zz > best:
                best, pick, how = zy * zy / zz, t, (hinge, zy / zz, sz, siz)
    if how is None:
        return pick, None
    # The joint fit: the line plus c times z made orthogonal to (1, i).
    hinge, c, sz, siz = how
    gz = (n * siz - si * sz) / det
    az = (sz - gz * si) / n
    fitted = []
    for i in range(n):
        z = 0.0 if i < pick else (float(i - pick + 1) if hinge else 1.0)
        fitted.append(a0 + b0 * i + c * (z - az - gz * i))
    return pick, fitted


def _fall_onset(seg: list):
    """The first eval of a fall: ``seg`` holds the evals from the reference (the best
    one, or the oldest of the window for a median reference) to the one that confirmed
    the fall, as (row index, step, phase_step, accuracy). The onset is the eval ``t >= 1``
    where a downward step, or a hinge (a fall that grows by the same amount at each eval
    from ``t`` on, already one unit at ``t``), from a constant level explains most of
    the squared deviation from the mean (least squares); a sudden fall is the confirming
    eval, a gradual one its first lower eval (on the benchmark's linear falls; an eval
    that bounces back up in the fall can make the later lower evals look like a step)."""
    n = len(seg)
    ys = [v[3] for v in seg]
    mean_y = sum(ys) / n
    best, pick = 0.0, n - 1
    for t in range(1, n):
        for z in ([0.0] * t + [1.0] * (n - t), [0.0] * t + [float(k) for k in range(1, n - t + 1)]):
            mean_z = sum(z) / n
            zz = zy = 0.0
            for zi, yi in zip(z, ys, strict=True):
                zz += (zi - mean_z) ** 2
                zy += (zi - mean_z) * (yi - mean_y)
            if zy < 0 and zz > 0 and zy * zy / zz > best:  # a fall, not a rise
                best, pick = zy * zy / zz, t
    return seg[pick]


def detect(rows, cfg: ml_collections.ConfigDict | None = None) -> list[dict]:
    """Offline detection: feeds ``rows`` in order through an :class:`OnlineDetector`.

    Args:
        rows: metrics rows, in logged order.
        cfg: thresholds (``default_config()`` when None).

    Returns:
        The episodes, as the online detector has them after the last row.
    """
    detector = OnlineDetector(cfg)
    for row in rows:
        detector.update(row)
    return detector.events


def config_for_run(stored) -> tuple[ml_collections.ConfigDict, str]:
    """The thresholds to re-detect a stored run with, and which they are.

    A run's own ``dropoff`` section when it is this detector's (it has every field of
    :func:`default_config`); the defaults for a run made with the first detector, whose
    point thresholds (a 1.3x ratio on the loss itself) mean something else here.
    """
    default = default_config()
    if isinstance(stored, collections.abc.Mapping) and all(
        isinstance(stored.get(sec), collections.abc.Mapping) and set(fields) <= set(stored[sec])
        for sec, fields in default.to_dict().items()
    ):
        return ml_collections.ConfigDict(dict(stored)), "the run's thresholds"
    return default, "the default thresholds: the run's config does not hold this detector's"


_SAME_KEYS = ("step", "phase", "metric", "kind", "end_step", "peak_step")


def same_episodes(a: list[dict], b: list[dict]) -> bool:
    """Whether two episode lists agree on what matters: onsets, kinds, ends and peaks."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if any(x.get(k) != y.get(k) for k in _SAME_KEYS):
            return False
        p, q = _as_float(x.get("peak_after")), _as_float(y.get("peak_after"))
        if p != q and not (math.isnan(p) and math.isnan(q)):
            return False
    return True


def describe(e: dict) -> str:
    """One line for an episode (``jaxrepro dropoffs``)."""
    where = f"step {e['step']} {e['phase']} {e['metric']} {e['kind']}"
    if e["kind"] == "nonfinite":
        what = f"{e.get('n_points', 1)} non-finite row(s)"
    else:
        peak = _as_float(e.get("peak_after", e.get("after")))
        what = f"{_as_float(e.get('before')):.4g} -> {peak:.4g}"
        if e.get("peak_step") is not None:
            what += f" at step {e['peak_step']}"
    end = e.get("end_step", e["step"])
    return f"{where} {what}, until step {end} (severity {severity(e):.3g})"


def read_metrics(path: str) -> list[dict]:
    """Reads metrics.jsonl (or a workdir holding one).

    A truncated last line (what a kill -9 during a write can leave) is dropped with a
    warning, so the rows are read up to the last whole one; a bad line anywhere else is
    an error naming it.

    Args:
        path: the metrics.jsonl file, or a run's workdir.

    Returns:
        The rows, in file order.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if pos == len(numbered) - 1:
                log.warning(
                    "%s:%d: the last line is truncated (%d characters, not a whole JSON "
                    "row): read up to the last whole row (%d rows)",
                    path,
                    lineno,
                    len(line),
                    len(rows),
                )
                break
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_dropoffs(workdir: str, missing_ok: bool = True) -> list[dict]:
    """Reads ``WORKDIR/dropoffs.json`` (either format; see the module docstring).

    Args:
        workdir: the run's working directory.
        missing_ok: return [] when the file does not exist (a run that has not
            written it yet); otherwise raise FileNotFoundError.

    Returns:
        The list of events; each has a ``severity``.
    """
    path = os.path.join(workdir, DROPOFFS_FILE)
    if not os.path.exists(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"no {DROPOFFS_FILE} in {workdir!r}")
    with open(path, encoding="utf-8") as f:
        try:
            events = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg})") from e
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError(f"{path} must hold a JSON list of event objects")
    for i, e in enumerate(events):
        missing = [k for k in ("step", "phase", "metric", "kind") if k not in e]
        if missing:
            raise ValueError(f"{path}: event {i} lacks {', '.join(map(repr, missing))}")
        if "severity" not in e:
            e["severity"] = severity(e)
    return events


def write_dropoffs(workdir: str, events: list[dict]) -> str:
    """Writes ``WORKDIR/dropoffs.json`` atomically (temp file, fsync, os.replace).

    Args:
        workdir: an existing directory.
        events: the events, e.g. ``OnlineDetector.events``.

    Returns:
        The path written.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    path = os.path.join(workdir, DROPOFFS_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".dropoffs.", suffix=".tmp", dir=workdir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(list(events), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
