"""Online and offline drop-off detection over a run's metrics rows.

A drop-off is a sharp rise of the training loss or a fall of evaluation accuracy
against the recent past of the same phase, or any NaN/Inf. The engine feeds every
row it logs to an :class:`OnlineDetector`; :func:`detect` feeds stored rows through
the same detector, so the online and offline answers agree by construction.

Rules (thresholds in :func:`default_config`):

* **loss rise** (train rows): against the rolling median ``m`` of the last
  ``loss.window`` finite losses of the phase, a loss ``v`` is flagged when the robust
  z-score ``(v - m) / max(1.4826 * MAD, loss.mad_floor * m)`` is at least
  ``loss.z_threshold`` *and* ``v / m >= loss.min_ratio`` *and*
  ``v - m >= loss.min_delta``. The z-score keeps batch noise quiet (it scales with the
  noise the curve itself shows); the ratio keeps tiny wiggles of a very smooth curve
  quiet; the floors keep a constant curve (MAD = 0) from flagging rounding noise.
* **accuracy fall** (eval rows, per split): against the max (or median) of the last
  ``accuracy.window`` evals of the same phase and split, an accuracy that is at least
  ``accuracy.min_drop`` lower (absolute, accuracies in [0, 1]) is flagged.
* **non-finite**: a train row whose loss is NaN/Inf or whose ``finite`` flag is false;
  an eval row whose loss or accuracy is NaN/Inf.

Histories reset at a phase change (a new head and a new data stream make the past
incomparable). Non-finite values never enter a history.

Merging: one episode, one event. A flagged point of a stream (phase, metric) that comes
within ``refractory`` logged points of that stream's previous flagged point of the same
kind extends the open event (``end_step``, ``n_points``, ``peak_after``,
``peak_size`` are updated in place) instead of making a new one. So a diverged run
that logs NaN every step yields one ``nonfinite`` event, and an accuracy that stays low
for several evals yields one ``fall`` event. ``before``/``after``/``size`` describe the
onset, which is where a replay should branch.
"""

from __future__ import annotations

import collections
import collections.abc
import json
import math
import numbers
import os
import tempfile
import types

import ml_collections
import numpy as np

DROPOFFS_FILE = "dropoffs.json"
METRICS_FILE = "metrics.jsonl"
SPLITS = ("source_test", "target_test")
_MAD_SCALE = 1.4826  # MAD -> standard deviation for a normal distribution


def default_config() -> ml_collections.ConfigDict:
    """Thresholds of the detector, chosen for the digits default (docs/findings.md).

    Loss is logged every step at batch 32 there, so batch noise is large: the robust
    coefficient of variation (1.4826 MAD / median over 20 steps) of a PyTorch ResNet-50
    run of that setup measured 0.22 / 0.31 / 0.51 (10th / 50th / 90th percentile). A
    point is flagged only well outside that noise (z >= 5) and at least 1.3x the rolling
    median: a jump of ratio r is caught where the noise is below (r - 1) / 5 of the
    level, so 1.3x on a smooth curve (CV < 0.06), 2x at CV < 0.2, 2.5x at CV < 0.3.
    Smaller single-batch jumps on the digits curve are inside its batch noise.
    One eval moves 10-20 points on the digits default; a fall of 10+ points below the
    best of the last 3 evals is flagged.

    Returns:
        A ConfigDict with ``loss``, ``accuracy`` and ``nonfinite`` sections.
    """
    c = ml_collections.ConfigDict()
    c.loss = ml_collections.ConfigDict()
    c.loss.window = 20  # logged points in the rolling reference
    c.loss.min_history = 10  # points needed before anything is judged
    c.loss.z_threshold = 5.0  # robust z-score of the rise
    c.loss.min_ratio = 1.3  # value / rolling median
    c.loss.min_delta = 0.01  # absolute rise, so a loss near 0 does not flag wiggles
    c.loss.mad_floor = 0.02  # sigma >= mad_floor * median (a flat curve has MAD 0)
    c.loss.refractory = 10  # logged points that merge into one episode
    c.accuracy = ml_collections.ConfigDict()
    c.accuracy.window = 3  # previous evals of the same phase and split
    c.accuracy.min_history = 1
    c.accuracy.min_drop = 0.10  # absolute fall, accuracy in [0, 1]
    c.accuracy.reference = "max"  # or 'median' of the window
    c.accuracy.refractory = 2  # evals that merge into one episode
    c.nonfinite = ml_collections.ConfigDict()
    c.nonfinite.enabled = True
    c.nonfinite.refractory = 10  # consecutive NaN rows are one event
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first impossible threshold in ``cfg``."""
    for section in ("loss", "accuracy", "nonfinite"):
        if section not in cfg:
            raise ValueError(f"drop-off config lacks section {section!r}")
    lo, acc = cfg.loss, cfg.accuracy
    _check(lo.window >= 3, f"loss.window must be >= 3, got {lo.window}")
    _check(
        1 <= lo.min_history <= lo.window,
        f"loss.min_history must be in [1, loss.window={lo.window}], got {lo.min_history}",
    )
    _check(lo.z_threshold > 0, f"loss.z_threshold must be > 0, got {lo.z_threshold}")
    _check(lo.min_ratio >= 1, f"loss.min_ratio must be >= 1, got {lo.min_ratio}")
    _check(lo.min_delta >= 0, f"loss.min_delta must be >= 0, got {lo.min_delta}")
    _check(lo.mad_floor > 0, f"loss.mad_floor must be > 0, got {lo.mad_floor}")
    _check(acc.window >= 1, f"accuracy.window must be >= 1, got {acc.window}")
    _check(
        1 <= acc.min_history <= acc.window,
        f"accuracy.min_history must be in [1, accuracy.window={acc.window}], got {acc.min_history}",
    )
    _check(0 < acc.min_drop <= 1, f"accuracy.min_drop must be in (0, 1], got {acc.min_drop}")
    _check(
        acc.reference in ("max", "median"),
        f"accuracy.reference must be 'max' or 'median', got {acc.reference!r}",
    )
    for name in ("loss", "accuracy", "nonfinite"):
        r = cfg[name].refractory
        _check(r >= 0, f"{name}.refractory must be >= 0, got {r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


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


class _Stream:
    """History and merge state of one (phase, metric) stream."""

    def __init__(self, window: int):
        self.values = collections.deque(maxlen=window)
        self.n_points = 0  # logged points seen, finite or not
        self.last_flag = {}  # kind -> (point number, open event)


class OnlineDetector:
    """Feeds metrics rows in order; reports drop-off events as they happen."""

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        """Makes a detector.

        Args:
            cfg: thresholds, as from :func:`default_config` (the default when None), or
                the same as a plain dict (e.g. read back from config.json).
        """
        if cfg is None:
            cfg = default_config()
        elif isinstance(cfg, collections.abc.Mapping):
            cfg = ml_collections.ConfigDict(cfg)
        self.cfg = cfg
        validate_config(self.cfg)
        # The loss thresholds as plain attributes: read on every train row.
        self._loss_cfg = types.SimpleNamespace(**self.cfg.loss.to_dict())
        self._events: list[dict] = []
        self._phase = None
        self._streams: dict[str, _Stream] = {}
        self._index = -1

    @property
    def events(self) -> list[dict]:
        """All events so far (merged episodes are updated in place)."""
        return self._events

    def update(self, row: dict) -> list[dict]:
        """Judges one metrics row against the past of its phase.

        Args:
            row: a train or eval row of metrics.jsonl (other kinds are counted, ignored).

        Returns:
            The new events this row opened (empty when it was quiet or merged).
        """
        if not isinstance(row, dict):
            raise ValueError(f"a metrics row must be a dict, got {type(row).__name__}")
        self._index += 1
        kind = row.get("kind")
        if kind not in ("train", "eval"):
            return []
        for key in ("step", "phase"):
            if key not in row:
                raise ValueError(f"metrics row {self._index} ({kind}) lacks {key!r}")
        if row["phase"] != self._phase:
            self._phase, self._streams = row["phase"], {}
        if kind == "train":
            return self._update_train(row)
        return self._update_eval(row)

    def _stream(self, metric: str, window: int) -> _Stream:
        if metric not in self._streams:
            self._streams[metric] = _Stream(window)
        return self._streams[metric]

    def _update_train(self, row: dict) -> list[dict]:
        lo = self._loss_cfg
        stream = self._stream("loss", lo.window)
        stream.n_points += 1
        if "loss" not in row:
            raise ValueError(f"train row {self._index} (step {row['step']}) lacks 'loss'")
        value = row["loss"]
        if not _finite(value) or row.get("finite", True) is False:
            if not self.cfg.nonfinite.enabled:
                return []
            return self._flag(
                stream, row, "loss", "nonfinite", math.nan, _as_float(value), math.nan
            )
        value, events = float(value), []
        if len(stream.values) >= lo.min_history:
            med = _median(stream.values)
            mad = _median([abs(v - med) for v in stream.values])
            sigma = max(_MAD_SCALE * mad, lo.mad_floor * abs(med))
            sigma = max(sigma, 1e-12)
            ratio = value / med if med > 0 else math.inf
            if (
                (value - med) / sigma >= lo.z_threshold
                and ratio >= lo.min_ratio
                and value - med >= lo.min_delta
            ):
                events = self._flag(stream, row, "loss", "rise", med, value, ratio)
        stream.values.append(value)
        return events

    def _update_eval(self, row: dict) -> list[dict]:
        acc = self.cfg.accuracy
        split = row.get("split")
        if split is None:
            raise ValueError(f"eval row {self._index} lacks 'split'")
        metric = f"accuracy/{split}"
        stream = self._stream(metric, acc.window)
        stream.n_points += 1
        if "accuracy" not in row:
            raise ValueError(f"eval row {self._index} (step {row['step']}) lacks 'accuracy'")
        value = row["accuracy"]
        if not _finite(value) or not _finite(row.get("loss", 0.0)):
            if not self.cfg.nonfinite.enabled:
                return []
            return self._flag(
                stream, row, metric, "nonfinite", math.nan, _as_float(value), math.nan
            )
        value, events = float(value), []
        if len(stream.values) >= acc.min_history:
            past = np.asarray(stream.values, dtype=np.float64)
            ref = float(past.max() if acc.reference == "max" else np.median(past))
            if ref - value >= acc.min_drop:
                events = self._flag(stream, row, metric, "fall", ref, value, ref - value)
        stream.values.append(value)
        return events

    def _refractory(self, metric: str, kind: str) -> int:
        if kind == "nonfinite":
            return self.cfg.nonfinite.refractory
        return self.cfg.loss.refractory if metric == "loss" else self.cfg.accuracy.refractory

    def _flag(self, stream, row, metric, kind, before, after, size) -> list[dict]:
        """Opens an event, or merges this point into the stream's open episode."""
        last = stream.last_flag.get(kind)
        if last is not None and stream.n_points - last[0] <= self._refractory(metric, kind):
            event = last[1]
            event["end_step"] = int(row["step"])
            event["n_points"] += 1
            if kind == "rise" and after > event["peak_after"]:
                event["peak_after"], event["peak_size"] = after, size
            elif kind == "fall" and after < event["peak_after"]:
                event["peak_after"], event["peak_size"] = after, size
            stream.last_flag[kind] = (stream.n_points, event)
            return []
        event = {
            "index": self._index,
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
            "peak_after": after,
            "peak_size": size,
        }
        stream.last_flag[kind] = (stream.n_points, event)
        self._events.append(event)
        return [event]


def detect(rows, cfg: ml_collections.ConfigDict | None = None) -> list[dict]:
    """Offline detection: feeds ``rows`` in order through an :class:`OnlineDetector`.

    Args:
        rows: metrics rows, in logged order.
        cfg: thresholds (``default_config()`` when None).

    Returns:
        The events, as the online detector would have reported them.
    """
    detector = OnlineDetector(cfg)
    for row in rows:
        detector.update(row)
    return detector.events


def read_metrics(path: str) -> list[dict]:
    """Reads metrics.jsonl (or a workdir holding one).

    A truncated last line (what a kill -9 during a write can leave) is dropped; a bad
    line anywhere else is an error.

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
                break  # a torn final write
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_dropoffs(workdir: str, missing_ok: bool = True) -> list[dict]:
    """Reads ``WORKDIR/dropoffs.json``.

    Args:
        workdir: the run's working directory.
        missing_ok: return [] when the file does not exist (a run that has not
            written it yet); otherwise raise FileNotFoundError.

    Returns:
        The list of events.
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
