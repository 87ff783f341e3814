"""TensorBoard event files of a run: ``RUN/tb/events.out.tfevents.*``.

``tensorboard --logdir STUDY_DIR`` then shows every run (``runs/aug3/tb``) and every
replay (``runs/aug3/replays/NAME/tb``) as its own run. Tags, one scalar per metric of a
metrics.jsonl row (``simple_value``, float32: the classic scalar every TensorBoard
version and reader understands)::

    {phase}/train/{loss,accuracy,lr,grad_norm,update_norm,param_norm}
    {phase}/eval/{split}/{loss,accuracy}
    dropoffs                   one text event per drop-off, at its onset step

The phase is part of the tag because at a phase boundary the old phase's final eval and
the new phase's first eval share a step (and pretrain and fine-tune losses are different
quantities). ``jaxrepro.compare.readers.read_tensorboard`` reads these tags back into the
rows they came from.

Why the ``tensorboard`` package writes them: its protobufs, its record framing
(``tensorboard.summary.writer.record_writer``, what PyTorch's own ``SummaryWriter``
writes with) and its summary builders need no TensorFlow, the project's reader already
uses them, and it is the program that displays the files. tensorboardX, the smaller
alternative, imports ``torch`` whenever torch is installed (``tensorboardX/writer.py``):
2 s more startup and a second framework in every training process.

Cost: rows are only appended to a list as they are logged (the host already holds them
for metrics.jsonl); :meth:`EventWriter.flush` encodes them and writes them with one
``write`` call. The run flushes at evals, before each checkpoint, at progress lines and at
the end, so the step loop itself never encodes, and a record is never half written.

Resume: every session of a run writes a new event file that starts with a
``SessionLog.START`` at the step it starts from. TensorBoard (and the project's reader)
then drop the older files' points at that step and after: exactly the steps the resumed
run executes again. Rows metrics.jsonl keeps at or after that step (the old phase's final
eval at a phase boundary) are written again after the marker, so the event files always
hold what metrics.jsonl holds. A workdir without event files (a run that had them turned
off, or an older run) gets every kept row written at its next start.
"""

from __future__ import annotations

import glob
import math
import os
import socket
import time

TB_DIR = "tb"
EVENT_GLOB = "events.out.tfevents.*"
TRAIN_SCALARS = ("loss", "accuracy", "lr", "grad_norm", "update_norm", "param_norm")
EVAL_SCALARS = ("loss", "accuracy")
DROPOFF_TAG = "dropoffs"


def tb_dir(workdir: str) -> str:
    return os.path.join(workdir, TB_DIR)


def event_files(workdir: str) -> list[str]:
    """The run's event files, oldest first (the order TensorBoard reads them in)."""
    return sorted(glob.glob(os.path.join(tb_dir(workdir), EVENT_GLOB)))


def row_scalars(row: dict) -> list[tuple[str, float]]:
    """(tag, value) of each scalar of a metrics.jsonl row (see the module docstring)."""
    phase = row.get("phase")
    if row.get("kind") == "train":
        prefix, names = f"{phase}/train/", TRAIN_SCALARS
    elif row.get("kind") == "eval":
        prefix, names = f"{phase}/eval/{row['split']}/", EVAL_SCALARS
    else:
        return []
    return [(prefix + k, float(row[k])) for k in names if k in row]


def dropoff_text(event: dict) -> str:
    """A drop-off event as one line of Markdown."""

    def num(x):
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"

    return (
        f"**{event['kind']}** of {event['metric']} at step {event['step']} "
        f"({event['phase']} step {event.get('phase_step')}): "
        f"{num(event.get('before'))} -> {num(event.get('after'))} "
        f"(size {num(event.get('size'))})"
    )


class EventWriter:
    """One session's event file; rows are buffered until :meth:`flush`."""

    def __init__(self, workdir: str, start_step: int):
        """Opens a new event file in ``WORKDIR/tb`` whose points replace every older
        file's points at ``start_step`` and after."""
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._pb = (event_pb2, summary_pb2, text_pb)
        directory = tb_dir(workdir)
        os.makedirs(directory, exist_ok=True)
        self.backfill = not event_files(workdir)  # no events yet: write every kept row
        self.path = _new_file_name(directory)
        # Unbuffered: each flush is one write() of whole records, so a kill -9 never
        # leaves half a record behind.
        self._file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - held for the run
        self._sink = _Collect()
        self._records = RecordWriter(self._sink)
        self._pending: list[tuple[float, object]] = []
        now = time.time()
        self._encode(event_pb2.Event(wall_time=now, step=start_step, file_version="brain.Event:2"))
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._encode(event_pb2.Event(wall_time=now, step=start_step, session_log=start))
        self.flush()

    def add_row(self, row: dict) -> None:
        """Buffers a metrics row (a list append; encoded at the next flush)."""
        self._pending.append((time.time(), row))

    def add_dropoff(self, event: dict) -> None:
        """Buffers a drop-off event, written as text at its onset step."""
        self._pending.append((time.time(), ("dropoff", event)))

    def flush(self) -> None:
        """Encodes what is buffered and appends it to the file in one write."""
        event_pb2, summary_pb2, text_pb = self._pb
        for wall, item in self._pending:
            if isinstance(item, tuple):
                event = item[1]
                summary = text_pb(DROPOFF_TAG, dropoff_text(event))
                step = event["step"]
            else:
                values = [
                    summary_pb2.Summary.Value(tag=tag, simple_value=value)
                    for tag, value in row_scalars(item)
                ]
                if not values:
                    continue
                summary, step = summary_pb2.Summary(value=values), item["step"]
            self._encode(event_pb2.Event(wall_time=wall, step=int(step), summary=summary))
        self._pending.clear()
        data = self._sink.take()
        if data:
            self._file.write(data)

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def _encode(self, event) -> None:
        self._records.write(event.SerializeToString())


class _Collect:
    """The file-like sink of RecordWriter: records collect in memory until taken."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _new_file_name(directory: str) -> str:
    """``events.out.tfevents.<seconds>.<host>.<n>.<pid>``: sorts in creation order, never
    one that exists (two sessions within a second differ in n, the count of files)."""
    n = len(glob.glob(os.path.join(directory, EVENT_GLOB)))
    stamp, host = int(time.time()), socket.gethostname()
    while True:
        path = os.path.join(
            directory, f"events.out.tfevents.{stamp:010d}.{host}.{n:04d}.{os.getpid()}"
        )
        if not os.path.exists(path):
            return path
        n += 1
