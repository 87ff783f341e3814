"""Readers of PyTorch results: files written by the real writers, or in documented layouts."""

import csv
import json

import numpy as np
import pytest

from jaxrepro.compare import readers
from jaxrepro.compare.readers import ReaderError, Target, read_results

pytest.importorskip("tensorboard")
SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter

N_TRAIN = 1500  # above TensorBoard's old 1,000-point reservoir: every point must come back


def _loss(step):
    return float(np.float32(2.0 / (1.0 + 0.01 * step)))


@pytest.fixture(scope="module")
def tb_dir(tmp_path_factory):
    """A run written by torch.utils.tensorboard: old- and new-style scalars, an image."""
    logdir = tmp_path_factory.mktemp("tb") / "run"
    writer = SummaryWriter(str(logdir))
    for step in range(N_TRAIN):
        writer.add_scalar("train/loss", _loss(step), step)
        if step % 100 == 99:
            writer.add_scalar("val/acc", step / 2000, step, new_style=True)
            writer.add_scalar("val_loss", 1.0 - step / 2000, step)
            writer.add_scalar("epoch", step // 100, step)
    writer.add_scalar("lr-Adam", 1e-3, 0)
    writer.add_image("sample", np.zeros((3, 4, 4), np.float32), 0)
    writer.close()
    return logdir


def test_tensorboard_every_point(tb_dir):
    rows = read_results(tb_dir)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(N_TRAIN))
    assert all(r["loss"] == _loss(r["step"]) for r in train)
    assert train[0]["lr"] == pytest.approx(1e-3)
    assert [r["step"] for r in evals] == list(range(99, N_TRAIN, 100))
    for r in evals:
        assert r["split"] == "val" and r["epoch"] == r["step"] // 100
        assert r["accuracy"] == pytest.approx(r["step"] / 2000)
        assert r["loss"] == pytest.approx(1.0 - r["step"] / 2000)
    assert all("sample" not in r for r in rows)


def test_tensorboard_restart_merges_and_last_value_wins(tmp_path):
    for offset in (0.0, 10.0):  # a resumed run re-logs steps 3..4 into a second file
        writer = SummaryWriter(str(tmp_path), filename_suffix=f".{int(offset)}")
        for step in range(3, 5) if offset else range(5):
            writer.add_scalar("loss", step + offset, step)
        writer.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    rows = read_results(tmp_path, phase="pretrain")
    assert [(r["step"], r["loss"], r["phase"]) for r in rows] == [
        (0, 0.0, "pretrain"),
        (1, 1.0, "pretrain"),
        (2, 2.0, "pretrain"),
        (3, 13.0, "pretrain"),
        (4, 14.0, "pretrain"),
    ]


def test_tensorboard_truncated_and_corrupt(tb_dir, tmp_path):
    (event_file,) = tb_dir.glob("events.out.tfevents.*")
    data = event_file.read_bytes()
    truncated = tmp_path / "trunc" / event_file.name
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) - 7])
    with pytest.raises(ReaderError, match="truncated record"):
        read_results(truncated)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt" / event_file.name
    corrupt.parent.mkdir()
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ReaderError, match="CRC mismatch"):
        read_results(corrupt)


def _write_lightning_csv(path):
    """metrics.csv as Lightning's CSVLogger writes it: one header, sparse rows."""
    header = ["epoch", "lr-Adam", "step", "train_acc_step", "train_loss_epoch", "train_loss_step"]
    header += ["val_acc", "val_loss"]
    lines = [
        {"lr-Adam": "0.001", "step": "0"},
        {"epoch": "0", "step": "0", "train_acc_step": "0.25", "train_loss_step": "2.5"},
        {"epoch": "0", "step": "1", "train_acc_step": "0.5", "train_loss_step": "2.0"},
        {"epoch": "0", "step": "1", "val_acc": "0.375", "val_loss": "1.75"},
        {"epoch": "0", "step": "1", "train_loss_epoch": "2.25"},
        {"epoch": "1", "step": "2", "train_acc_step": "0.75", "train_loss_step": "nan"},
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(lines)


def test_lightning_csv(tmp_path):
    _write_lightning_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    rows = read_results(tmp_path, phase="finetune")
    assert rows[:3] == [
        {"kind": "train", "step": 0, "phase": "finetune", "lr": 0.001, "accuracy": 0.25}
        | {"loss": 2.5, "epoch": 0},
        {"kind": "train", "step": 1, "phase": "finetune", "accuracy": 0.5, "loss": 2.0}
        | {"loss_epoch": 2.25, "epoch": 0},
        {"kind": "eval", "step": 1, "phase": "finetune", "split": "val", "accuracy": 0.375}
        | {"loss": 1.75, "epoch": 0},
    ]
    assert rows[3]["step"] == 2 and rows[3]["epoch"] == 1 and np.isnan(rows[3]["loss"])
    assert len(rows) == 4


def test_custom_mapping(tmp_path):
    path = tmp_path / "metrics.csv"
    _write_lightning_csv(path)
    mapping = {"val_acc": ("eval", "accuracy", "target_test"), "val_loss": None}
    evals = [r for r in read_results(path, mapping) if r["kind"] == "eval"]
    assert evals == [{"kind": "eval", "step": 1, "split": "target_test", "accuracy": 0.375}
                     | {"epoch": 0}]  # fmt: skip


@pytest.mark.parametrize(
    "name,target",
    [
        ("train/loss", Target("train", "loss")),
        ("Train_Acc", Target("train", "accuracy")),
        ("val-top1", Target("eval", "accuracy", "val")),
        ("test_acc_epoch", Target("eval", "accuracy_epoch", "test")),
        ("grad_norm", Target("train", "grad_norm")),
        ("lr-AdamW", Target("train", "lr")),
        ("validation/f1", Target("eval", "f1", "val")),
    ],
)
def test_resolve(name, target):
    assert readers.resolve(name) == target


def test_csv_errors(tmp_path):
    bad = tmp_path / "a.csv"
    bad.write_text("epoch,train_loss\n0,1.0\n")
    with pytest.raises(ReaderError, match="no 'step' column"):
        read_results(bad)
    bad.write_text("step,train_loss\n0,1.0\n1,abc\n")
    with pytest.raises(ReaderError, match=r"a.csv:3: column 'train_loss': not a number"):
        read_results(bad)
    path = tmp_path / "metrics.csv"
    _write_lightning_csv(path)
    text = path.read_text()
    path.write_text(text[: text.rindex(",")])  # cut inside the last line
    with pytest.raises(ReaderError, match="truncated"):
        read_results(path)
    bad.write_text("")
    with pytest.raises(ReaderError, match="empty CSV"):
        read_results(bad)


def test_jsonl_wide_long_and_native(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [
        {"step": 1, "train_loss": 0.5, "lr": 0.01, "wall_time": 123.0},
        {"global_step": 2, "train_loss": 0.25, "phase": "pretrain"},
        {"step": 2, "tag": "val/acc", "value": 0.75},
        {"kind": "eval", "step": 3, "phase": "finetune", "split": "target_test", "accuracy": 1.0},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    assert read_results(path) == [
        {"kind": "train", "step": 1, "loss": 0.5, "lr": 0.01},
        {"kind": "train", "step": 2, "phase": "pretrain", "loss": 0.25},
        {"kind": "eval", "step": 2, "split": "val", "accuracy": 0.75},
        lines[3],
    ]


def test_jsonl_errors(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with pytest.raises(ReaderError, match=r"log.jsonl:2: invalid JSON"):
        read_results(path)
    path.write_text('{"loss": 0.5}\n')
    with pytest.raises(ReaderError, match="no 'step' field"):
        read_results(path)
    path.write_text('{"step": 1, "loss": "high"}\n')
    with pytest.raises(ReaderError, match="'loss' is not a number"):
        read_results(path)
    path.write_text('{"step": 1.5, "loss": 1}\n')
    with pytest.raises(ReaderError, match="non-negative integer"):
        read_results(path)


def test_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "nope")
    with pytest.raises(ReaderError, match="no results found"):
        read_results(tmp_path)
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ReaderError, match="unknown results format"):
        read_results(tmp_path / "x.txt")
    _write_lightning_csv(tmp_path / "version_0" / "metrics.csv")
    _write_lightning_csv(tmp_path / "version_1" / "metrics.csv")
    with pytest.raises(ReaderError, match="several runs"):
        read_results(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(ReaderError, match="several formats"):
        read_results(tmp_path)
