"""``jaxrepro compare`` on workdirs and result files written here (no training).

The real JAX-vs-reference pair (checkpoint restore, parameter distance after porting of a
trained run) is compared in test_reference.py; these tests check the arithmetic, the
input forms, the statistics and the errors on inputs whose answers are known.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from helpers import REPO, load

torch = pytest.importorskip("torch")

from jaxrepro import config as config_lib  # noqa: E402
from jaxrepro.compare import readers, report, torch_port, torch_resnet  # noqa: E402
from jaxrepro.compare.report import CompareError  # noqa: E402
from jaxrepro.errors import JaxreproError  # noqa: E402

JAX_ACC = [0.6, 0.7, 0.8, 0.9]
TORCH_ACC = [0.5, 0.6, 0.7, 0.8]
STEPS = 10


def _loss(seed, step):
    return 2.0 - 0.1 * step + 0.01 * seed


def _rows(seed, final_acc, loss_offset=0.0):
    rows = []
    for step in range(STEPS):
        rows.append({"kind": "train", "step": step, "phase": "pretrain", "phase_step": step,
                     "epoch": 0, "loss": _loss(seed, step) + loss_offset * step, "accuracy": 0.5,
                     "grad_norm": 1.0 + 0.1 * step, "update_norm": 0.1, "param_norm": 10.0,
                     "lr": 1e-3, "finite": True})  # fmt: skip
    for step, acc in ((0, 0.1), (5, final_acc - 0.1), (STEPS, final_acc)):
        rows.append({"kind": "eval", "step": step, "phase": "pretrain", "phase_step": step,
                     "split": "source_test", "loss": 1.0, "accuracy": acc, "n": 100})  # fmt: skip
    return rows


def _write_run(path, rows, seed, framework=None):
    os.makedirs(path)
    config = config_lib.to_dict(load("digits", "smoke"))
    config["seed"] = seed
    info = {"status": "done", "step": STEPS, "seeds": {"init": seed}}
    if framework:
        info["framework"] = framework
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump(info, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture
def study(tmp_path):
    """A JAX study (study.json + runs/s<i>/) and a dir of reference runs of the same seeds.

    The reference loss of seed i differs from the JAX one by 1e-3 * step, exactly.
    """
    jax_dir, torch_dir = tmp_path / "study", tmp_path / "torch"
    (jax_dir / "runs").mkdir(parents=True)
    (jax_dir / "study.json").write_text("{}")
    for seed, (a, b) in enumerate(zip(JAX_ACC, TORCH_ACC, strict=True)):
        _write_run(jax_dir / "runs" / f"s{seed}", _rows(seed, a), seed)
        _write_run(torch_dir / f"t{seed}", _rows(seed, b, 1e-3), seed, framework="pytorch")
    return jax_dir, torch_dir


def test_study_against_reference_runs(study, tmp_path):
    jax_dir, torch_dir = study
    unstarted = jax_dir / "runs" / "s9"  # a study run that has not logged yet: left out
    _write_run(unstarted, [], 9)
    out = tmp_path / "out"
    result = report.compare(jax_dir, torch_dir, out)
    assert result["jax"]["kind"] == "study" and result["jax"]["runs"] == ["s0", "s1", "s2", "s3"]
    assert result["torch"]["kind"] == "reference"
    # Same config (seed i with seed i): one pair per seed, each with the known divergence.
    assert [(p["jax"], p["torch"]) for p in result["pairs"]] == [
        (f"s{i}", f"t{i}") for i in range(4)
    ]
    for pair in result["pairs"]:
        per_step = pair["divergence"]["train"]["per_step"]
        assert [p["loss_abs_diff"] for p in per_step] == pytest.approx(
            [1e-3 * s for s in range(STEPS)]
        )
        assert pair["divergence"]["train"]["first"]["loss_rel_diff"] == 0.0
        assert pair["divergence"]["eval"]["max_accuracy_abs_diff"] == pytest.approx(0.1)
        assert "no saved weights" in pair["params"]["unavailable"]
    d = result["distributions"]["pretrain/source_test accuracy (final)"]
    assert d["jax"] == JAX_ACC and d["pytorch"] == TORCH_ACC
    c = d["comparison"]
    assert c["diff"] == pytest.approx(0.1) and c["n_a"] == c["n_b"] == 4
    assert c["diff_ci_low"] <= 0.1 <= c["diff_ci_high"]
    assert 0 < c["test"]["p_value"] <= 1 and c["test"]["name"] in ("welch_t", "permutation")
    saved = json.loads((out / "compare.json").read_text())
    assert saved["distributions"] == json.loads(json.dumps(result["distributions"]))
    text = (out / "report.md").read_text()
    for name in result["figures"]:
        assert (out / name).stat().st_size > 0 and f"({name})" in text
    assert {"loss_pretrain.png", "accuracy_pretrain_source_test.png", "divergence.png"} <= set(
        result["figures"]
    )


def test_a_different_config_is_not_paired(study, tmp_path):
    jax_dir, torch_dir = study
    result = report.compare(jax_dir / "runs" / "s0", torch_dir / "t1", tmp_path / "out")
    assert result["jax"]["kind"] == "run" and result["pairs"] == []
    assert "No PyTorch run has the config" in (tmp_path / "out" / "report.md").read_text()
    d = result["distributions"]["pretrain/source_test accuracy (final)"]
    assert d["comparison"] is None and "2 runs" in d["note"]


def _tiny_state_dict(seed):
    torch.manual_seed(seed)
    model = torch_resnet.build("resnet_tiny", 10, stem="cifar")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def test_param_distance_after_porting():
    sd = _tiny_state_dict(0)
    variables = torch_port.torch_to_flax(sd, "resnet_tiny")
    same = report.param_distance(variables, sd, "resnet_tiny")
    assert same["l2"] == 0.0 and same["max_abs"] == 0.0 and same["bn_stats_l2"] == 0.0
    moved = {k: v.clone() for k, v in sd.items()}
    delta = torch.randn(
        moved["layer1.0.conv1.weight"].shape, generator=torch.Generator().manual_seed(1)
    )
    moved["layer1.0.conv1.weight"] += 1e-3 * delta
    moved["bn1.running_mean"] += 0.5
    d = report.param_distance(variables, moved, "resnet_tiny")
    assert d["l2"] == pytest.approx(1e-3 * float(delta.norm()), rel=1e-4)
    assert d["max_abs"] == pytest.approx(1e-3 * float(delta.abs().max()), rel=1e-4)
    assert d["bn_stats_l2"] == pytest.approx(
        0.5 * math.sqrt(sd["bn1.running_mean"].numel()), rel=1e-5
    )
    assert d["worst"][0]["key"] == "bn1.running_mean"
    params = [v for k, v in sd.items() if k.endswith(("weight", "bias"))]
    norm = math.sqrt(sum(float((p.double() ** 2).sum()) for p in params))
    assert d["rel"] == pytest.approx(d["l2"] / norm, rel=1e-6)
    with pytest.raises(torch_port.PortError, match="not fit resnet18"):
        report.param_distance(variables, sd, "resnet18")


def _lightning_csv(path, seed, final_acc):
    """A Lightning CSVLogger metrics.csv: step rows, then a validation row per 'epoch'."""
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train_loss", "val_acc"])
        for step in range(STEPS):
            w.writerow([0, step, _loss(seed, step) + 0.05, ""])
        w.writerow([0, STEPS, "", final_acc])


def test_pytorch_result_files_one_run_per_subdirectory(study, tmp_path):
    jax_dir, _ = study
    results = tmp_path / "lightning"
    for seed, acc in enumerate(TORCH_ACC):
        _lightning_csv(results / f"seed{seed}" / "lightning_logs" / "version_0" / "metrics.csv",
                       seed, acc)  # fmt: skip
    mapping = {"val_acc": ("eval", "accuracy", "source_test")}
    result = report.compare(jax_dir, results, tmp_path / "out", mapping=mapping)
    assert result["torch"] == {"path": str(results), "kind": "results",
                               "runs": ["seed0", "seed1", "seed2", "seed3"]}  # fmt: skip
    assert result["pairs"] == []  # result files carry no config: no same-batches claim
    assert result["distributions"]["pretrain/source_test accuracy (final)"]["pytorch"] == TORCH_ACC
    loss = result["distributions"]["pretrain train loss (mean of last 10)"]
    assert loss["comparison"]["diff"] == pytest.approx(-0.05)  # the CSV losses are 0.05 higher
    assert "taken as phase 'pretrain'" in result["notes"][0]
    # Without a mapping, 'val_acc' lands in split 'val': only the train loss is in common.
    plain = report.compare(jax_dir, results / "seed0", tmp_path / "out2")
    assert list(plain["distributions"]) == ["pretrain train loss (mean of last 10)"]


def _bad(tmp_path, kind):
    """(jax, torch) inputs for one kind of bad input; the study fixture's runs are valid."""
    good = tmp_path / "good"
    _write_run(good, _rows(0, 0.5), 0)
    ref = _write_run(tmp_path / "ref", _rows(0, 0.5), 0, framework="pytorch")
    empty = tmp_path / "empty"
    empty.mkdir()
    if kind == "missing jax":
        return tmp_path / "nope", ref
    if kind == "jax not a run":
        return empty, ref
    if kind == "missing torch":
        return good, tmp_path / "nope"
    if kind == "torch empty dir":
        return good, empty
    if kind == "jax run as torch":
        return good, good
    if kind == "no metrics":
        (good / "metrics.jsonl").write_text("")
        return good, ref
    csv_path = tmp_path / "metrics.csv"
    if kind == "truncated csv":
        csv_path.write_text("step,train_loss,val_acc\n0,2.0,0.5\n1,")
        return good, csv_path
    csv_path.write_text("step,gpu_mem\n0,100\n1,101\n")  # nothing comparable
    return good, csv_path


BAD = {
    "missing jax": "--jax: .* does not exist",
    "jax not a run": "neither a jaxrepro run",
    "missing torch": "--torch: .* does not exist",
    "torch empty dir": "no reference run .* and no results",
    "jax run as torch": "is a jax run, not a pytorch one",
    "no metrics": "no metrics rows",
    "truncated csv": "truncated or corrupt",
    "nothing comparable": "nothing to compare",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_a_clear_error(tmp_path, kind):
    jax_path, torch_path = _bad(tmp_path, kind)
    with pytest.raises(JaxreproError, match=BAD[kind]) as info:
        report.compare(jax_path, torch_path, tmp_path / "out")
    assert isinstance(info.value, ValueError)  # CompareError and ReaderError are both
    assert not (tmp_path / "out" / "report.md").exists()


def test_error_classes_reach_the_cli_as_errors():
    for cls in (CompareError, readers.ReaderError, torch_port.PortError):
        assert issubclass(cls, JaxreproError) and issubclass(cls, ValueError)
    with pytest.raises(JaxreproError, match="--torch is required"):
        report.main_from_flags(types.SimpleNamespace(jax="a", torch=None, out="o"))


def test_cli_compare_missing_input_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrepro", "compare", f"--jax={tmp_path / 'nope'}",
         f"--torch={tmp_path}", f"--out={tmp_path / 'out'}"],  # fmt: skip
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --jax:")
    assert "Traceback" not in proc.stderr
    np.testing.assert_equal(os.path.exists(tmp_path / "out"), False)
