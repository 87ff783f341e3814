"""Reads PyTorch training results into jaxrepro's metrics rows.

Formats (``read_results`` picks one from the file name, or searches a directory):

* **CSV** in PyTorch Lightning's ``CSVLogger`` layout (``metrics.csv``): a header with a
  ``step`` column, usually ``epoch``, and one column per metric; cells a row did not log
  are empty.
* **JSONL**: one JSON object per line, either *wide* (``{"step": 3, "train_loss": 0.7,
  "val_acc": 0.5}``) or *long* (``{"step": 3, "tag": "train/loss", "value": 0.7}``).
  A line that already has ``"kind"`` is a jaxrepro row (e.g. a jaxrepro ``metrics.jsonl``)
  and is passed through. A wide line may carry ``phase``; ``global_step`` may stand for
  ``step``; ``wall_time``/``time``/``timestamp`` are ignored.
* **TensorBoard** event files (``events.out.tfevents.*``), read record by record (TFRecord
  framing, CRCs checked) with the protobufs of the ``tensorboard`` package: no TensorFlow,
  and every scalar point is kept (no reservoir sampling). Both ``simple_value`` scalars and
  the ``scalars`` plugin's tensors are read; images, histograms and text are skipped.
  A ``SessionLog.START`` at step s (a restarted writer's, e.g. a resumed jaxrepro run's)
  drops the points read so far at step s and after, as TensorBoard does.

Metric names are mapped onto jaxrepro's as follows. A source name is first looked up as
written, then *normalised* (lower case; ``/``, ``-``, ``.`` and spaces become ``_``; a
Lightning ``_step`` suffix is dropped), in the user's ``mapping`` and then in
``DEFAULT_MAPPING``. Otherwise a prefix decides the row: ``train_``/``training_`` -> a
``train`` row; ``val_``/``valid_``/``validation_`` -> an ``eval`` row with split ``val``;
``test_`` -> split ``test``; ``eval_`` -> split ``eval``. The rest of the name goes through
``ALIASES`` (``acc`` -> ``accuracy``, ``learning_rate`` -> ``lr``, ...) and is kept as is
when it has no alias. A name without a known prefix (``loss``, ``grad_norm``) belongs to a
``train`` row. ``epoch`` is attached to every row of its step. Lightning's epoch
aggregates (``train_loss_epoch``) become ``loss_epoch`` so they do not overwrite the step
values. Values are not rescaled: an accuracy logged in percent stays in percent.

A mapping entry is a ``Target(kind, name, split)``, a tuple of the same, or None to drop
the metric: ``{"val_acc": ("eval", "accuracy", "target_test"), "gpu_mem": None}``.
Steps are kept as the writer logged them (Lightning's are 0-based global steps).

jaxrepro's own event files (``jaxrepro.tbevents``) are read back into the rows they came
from: ``{phase}/train/{metric}`` -> a ``train`` row of that phase,
``{phase}/eval/{split}/{metric}`` -> an ``eval`` row of that phase and split (a user's
``mapping`` still comes first).
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

from jaxrepro.errors import JaxreproError


class ReaderError(JaxreproError, ValueError):
    """A results file that cannot be read: corrupt, truncated, or of an unknown layout."""


class Target(NamedTuple):
    """Where a source metric goes: row ``kind`` ('train'|'eval'), metric ``name``, ``split``."""

    kind: str
    name: str
    split: str | None = None


PREFIXES = {
    "train": ("train", None),
    "training": ("train", None),
    "val": ("eval", "val"),
    "valid": ("eval", "val"),
    "validation": ("eval", "val"),
    "test": ("eval", "test"),
    "eval": ("eval", "eval"),
}
ALIASES = {
    "acc": "accuracy",
    "acc1": "accuracy",
    "top1": "accuracy",
    "top1_acc": "accuracy",
    "accuracy": "accuracy",
    "loss": "loss",
    "lr": "lr",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
}
DEFAULT_MAPPING = {
    "loss": Target("train", "loss"),
    "acc": Target("train", "accuracy"),
    "accuracy": Target("train", "accuracy"),
    "lr": Target("train", "lr"),
    "learning_rate": Target("train", "lr"),
    # Lightning's LearningRateMonitor logs 'lr-Adam' (normalised: 'lr_adam').
    "lr_adam": Target("train", "lr"),
    "lr_adamw": Target("train", "lr"),
    "lr_sgd": Target("train", "lr"),
}
_STEP_KEYS = ("step", "global_step")
_IGNORED_KEYS = {"wall_time", "time", "timestamp"}
_KIND_ORDER = {"train": 0, "eval": 1}
_EVENT_GLOB = "events.out.tfevents.*"


def normalise(name: str) -> str:
    """Lower case, with ``/ - .`` and spaces as ``_`` and a trailing ``_step`` removed."""
    out = name.lower()
    for ch in "/-. ":
        out = out.replace(ch, "_")
    return out[: -len("_step")] if out.endswith("_step") and out != "_step" else out


_PHASES = ("pretrain", "finetune")


def native(name: str) -> tuple[Target, str] | None:
    """(target, phase) of a jaxrepro event file's tag (jaxrepro.tbevents), else None."""
    parts = name.split("/")
    if len(parts) < 3 or parts[0] not in _PHASES or not all(parts):
        return None
    if parts[1] == "train" and len(parts) == 3:
        return Target("train", parts[2]), parts[0]
    if parts[1] == "eval" and len(parts) == 4:
        return Target("eval", parts[3], parts[2]), parts[0]
    return None


def resolve(name: str, mapping: dict | None = None) -> Target | None:
    """The ``Target`` of a source metric name (see the module docstring), None to drop it."""
    norm = normalise(name)
    for table in (mapping or {}, DEFAULT_MAPPING):
        for key in (name, norm):
            if key in table:
                value = table[key]
                return None if value is None else Target(*value)
    epoch_aggregate = norm.endswith("_epoch")
    base = norm[: -len("_epoch")] if epoch_aggregate else norm
    prefix, _, rest = base.partition("_")
    kind, split = PREFIXES.get(prefix, ("train", None))
    if prefix not in PREFIXES or not rest:
        rest = base
    metric = ALIASES.get(rest, rest) + ("_epoch" if epoch_aggregate else "")
    return Target(kind, metric, split)


class _Rows:
    """Collects (step, source name, value) points into jaxrepro rows."""

    def __init__(self, mapping, phase):
        self.mapping, self.phase = mapping, phase
        self.rows: dict[tuple, dict] = {}
        self.epochs: dict[int, float] = {}

    def add(self, step: int, name: str, value: float, phase: str | None = None) -> None:
        if normalise(name) == "epoch":
            self.epochs[step] = value
            return
        mapped = self.mapping and (name in self.mapping or normalise(name) in self.mapping)
        own = None if mapped else native(name)
        if own is not None:
            target, phase = own
        else:
            target = resolve(name, self.mapping)
        if target is None:
            return
        phase = phase if phase is not None else self.phase
        key = (step, _KIND_ORDER.get(target.kind, 2), target.kind, target.split or "", phase)
        row = self.rows.get(key)
        if row is None:
            row = {"kind": target.kind, "step": step}
            if phase is not None:
                row["phase"] = phase
            if target.split is not None:
                row["split"] = target.split
            self.rows[key] = row
        row[target.name] = value

    def add_native(self, row: dict) -> None:
        key = (row.get("step", -1), _KIND_ORDER.get(row["kind"], 2), row["kind"], "", None, id(row))
        self.rows[key] = dict(row)

    def result(self) -> list[dict]:
        out = []
        for key in sorted(self.rows, key=lambda k: (*k[:4], k[4] or "", *k[5:])):
            row = self.rows[key]
            epoch = self.epochs.get(row.get("step"))
            if epoch is not None and "epoch" not in row:
                row["epoch"] = int(epoch) if float(epoch).is_integer() else epoch
            out.append(row)
        return out


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ReaderError(f"{where}: not a number: {text!r}") from None


def _step(value, where: str) -> int:
    step = _number(value, where) if isinstance(value, str) else value
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
        raise ReaderError(f"{where}: step is not a number: {value!r}")
    if not float(step).is_integer() or step < 0:
        raise ReaderError(f"{where}: step must be a non-negative integer, got {value!r}")
    return int(step)


def read_csv(path, mapping=None, *, phase=None) -> list[dict]:
    """Reads a Lightning CSVLogger ``metrics.csv`` (see the module docstring)."""
    collector = _Rows(mapping, phase)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ReaderError(f"{path}: empty CSV file, expected a header with a 'step' column")
        if "step" not in header:
            raise ReaderError(f"{path}: no 'step' column in the header {header}")
        step_col = header.index("step")
        for cells in reader:
            where = f"{path}:{reader.line_num}"
            if len(cells) != len(header):
                raise ReaderError(
                    f"{where}: {len(cells)} fields where the header has {len(header)} "
                    "(truncated or corrupt file?)"
                )
            step = _step(cells[step_col], f"{where}: column 'step'")
            for name, cell in zip(header, cells, strict=True):
                if name != "step" and cell != "":
                    collector.add(step, name, _number(cell, f"{where}: column {name!r}"))
    return collector.result()


def _jsonl_line(collector: _Rows, obj, where: str) -> None:
    if not isinstance(obj, dict):
        raise ReaderError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "kind" in obj:
        collector.add_native(obj)
        return
    step_key = next((k for k in _STEP_KEYS if k in obj), None)
    if step_key is None:
        raise ReaderError(f"{where}: no 'step' field in {sorted(obj)}")
    step = _step(obj[step_key], where)
    phase = obj.get("phase")
    if "tag" in obj and "value" in obj:  # long format
        items = [(str(obj["tag"]), obj["value"])]
    else:
        skip = {step_key, "phase", *_IGNORED_KEYS}
        items = [(k, v) for k, v in obj.items() if k not in skip]
    for name, value in items:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ReaderError(f"{where}: field {name!r} is not a number: {value!r}")
        collector.add(step, name, float(value), phase)


def read_jsonl(path, mapping=None, *, phase=None) -> list[dict]:
    """Reads a JSONL results file, wide or long (see the module docstring)."""
    collector = _Rows(mapping, phase)
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReaderError(f"{path}:{number}: invalid JSON (truncated?): {e}") from None
            _jsonl_line(collector, obj, f"{path}:{number}")
    return collector.result()


def _records(path: Path):
    """Yields the payloads of a TFRecord file, checking lengths and masked CRC32Cs."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ReaderError(f"{path}: truncated record header at byte {pos}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if masked_crc32c(header) != header_crc:
            raise ReaderError(f"{path}: corrupt record header (CRC mismatch) at byte {pos}")
        end = pos + 12 + length
        if end + 4 > len(data):
            raise ReaderError(f"{path}: truncated record at byte {pos} (file ends early)")
        payload = data[pos + 12 : end]
        if masked_crc32c(payload) != struct.unpack("<I", data[end : end + 4])[0]:
            raise ReaderError(f"{path}: corrupt record (CRC mismatch) at byte {pos}")
        yield payload
        pos = end + 4


def _scalar(value) -> float | None:
    """The float of a summary value holding a scalar, None for other summaries."""
    from tensorboard.util import tensor_util

    field = value.WhichOneof("value")
    if field == "simple_value":
        return float(value.simple_value)
    plugin = value.metadata.plugin_data.plugin_name
    if field == "tensor" and plugin in ("", "scalars"):
        array = tensor_util.make_ndarray(value.tensor)
        if array.size == 1 and array.dtype.kind in "fiu":
            return float(array.reshape(()))
    return None


def read_tensorboard(paths, mapping=None, *, phase=None) -> list[dict]:
    """Reads every scalar point of TensorBoard event files (merged in the given order).

    A (tag, step) logged twice (e.g. by a resumed run) keeps the value written last; a
    ``SessionLog.START`` at step s drops every point read before it at step s and after.
    """
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    points: dict[tuple[str, int], float] = {}
    for path in [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]:
        for number, payload in enumerate(_records(path)):
            event = event_pb2.Event()
            try:
                event.ParseFromString(payload)
            except DecodeError as e:
                raise ReaderError(f"{path}: record {number} is not an Event: {e}") from None
            if event.session_log.status == event_pb2.SessionLog.START:  # a restart
                points = {k: v for k, v in points.items() if k[1] < event.step}
            for value in event.summary.value:
                scalar = _scalar(value)
                if scalar is not None:
                    points[(value.tag, int(event.step))] = scalar
    collector = _Rows(mapping, phase)
    for (tag, step), value in points.items():
        collector.add(step, tag, value)
    return collector.result()


def _find(directory: Path) -> tuple[str, list[Path]]:
    """The format and files of the results under ``directory``; errors when ambiguous."""
    found = {
        "csv": sorted(directory.rglob("metrics.csv")),
        "jsonl": sorted(directory.rglob("*.jsonl")),
        "tensorboard": sorted(directory.rglob(_EVENT_GLOB)),
    }
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise ReaderError(f"{directory}: no results found (metrics.csv, *.jsonl or {_EVENT_GLOB})")
    files = [str(p) for v in found.values() for p in v]
    if len(found) > 1:
        raise ReaderError(f"{directory}: results in several formats, pass one file: {files}")
    ((fmt, paths),) = found.items()
    if fmt == "tensorboard" and len({p.parent for p in paths}) == 1:
        return fmt, paths  # one run's event files (e.g. after a restart): merge them
    if len(paths) > 1:
        raise ReaderError(f"{directory}: several runs' results, pass one of: {files}")
    return fmt, paths


def read_results(path: str | os.PathLike, mapping: dict | None = None, *, phase=None):
    """Reads PyTorch training results into jaxrepro metrics rows.

    Args:
      path: a ``.csv``, ``.jsonl``/``.json`` or ``events.out.tfevents.*`` file, or a
        directory holding results in one of those formats (searched recursively).
      mapping: source metric name -> ``Target``, tuple, or None (drop); it takes
        precedence over the default mapping described in the module docstring.
      phase: a jaxrepro phase (e.g. ``'finetune'``) given to rows that carry none.

    Returns:
      Rows like ``{"kind": "train", "step": 12, "loss": ..., "accuracy": ...}`` and
      ``{"kind": "eval", "step": 20, "split": "val", "accuracy": ...}``, sorted by step,
      train rows before eval rows.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ReaderError: for a corrupt, truncated, ambiguous or unknown results file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    if path.is_dir():
        fmt, paths = _find(path)
    elif path.name.startswith("events.out.tfevents"):
        fmt, paths = "tensorboard", [path]
    elif path.suffix in (".csv", ".jsonl", ".json"):
        fmt, paths = ("csv" if path.suffix == ".csv" else "jsonl"), [path]
    else:
        raise ReaderError(f"{path}: unknown results format (want .csv, .jsonl, or {_EVENT_GLOB})")
    if fmt == "tensorboard":
        return read_tensorboard(paths, mapping, phase=phase)
    reader = read_csv if fmt == "csv" else read_jsonl
    return reader(paths[0], mapping, phase=phase)
