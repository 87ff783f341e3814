"""Bad input: a clear error naming the problem, a non-zero exit, nothing on disk lost."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, set_dotted, snapshot, tiny_digits

from jaxrepro import config as config_lib
from jaxrepro.errors import ConfigError, WorkdirError
from jaxrepro.train import loop


def cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXREPRO_COMPILE_CACHE="0")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "jaxrepro", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--config.optimizer.lerning_rate=0.1", "lerning_rate"),
        ("--config.optimizer.lr=fast", "lr"),
    ],
)
def test_override_typos_and_types_fail_before_work(override, needle, tmp_path):
    r = cli("train", "--config=configs/digits.py:smoke", f"--workdir={tmp_path}/w", override)
    assert r.returncode != 0
    assert needle in r.stderr
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
    "dotted, value, field",
    [
        ("optimizer.lr", -1.0, "optimizer.lr"),
        ("data.source.name", "cifar11", "data.source.name"),
        ("data.target.name", "no_such_set", "data.target.name"),
        ("model.name", "resnet51", "model.name"),
        ("model.stem", "tiny", "model.stem"),
        ("pretrain.batch_size", 0, "pretrain.batch_size"),
        ("data.augment.flip.prob", 1.5, "data.augment.flip.prob"),
        ("optimizer.b2", 1.0, "optimizer.b2"),
        ("optimizer.schedule", "linear", "optimizer.schedule"),
        ("train.nonfinite_policy", "ignore", "train.nonfinite_policy"),
    ],
)
def test_impossible_values_name_the_field(dotted, value, field, data_dir, tmp_path):
    config = tiny_digits(data_dir)
    set_dotted(config, dotted, value)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        loop.run(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_cli_reports_a_bad_value_with_exit_2(tmp_path, data_dir):
    r = cli(
        "train",
        "--config=configs/digits.py:smoke",
        f"--workdir={tmp_path}/w",
        f"--config.data.data_dir={data_dir}",
        "--config.data.source.name=cifar11",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error:" in r.stderr and "data.source.name" in r.stderr and "cifar11" in r.stderr
    assert not os.path.exists(tmp_path / "w")


def test_validate_rejects_batch_larger_than_the_target_set(data_dir, tmp_path):
    config = tiny_digits(data_dir)
    config.finetune.steps = None
    config.finetune.epochs = 1
    config.finetune.batch_size = 512  # digits_shifted has 150 fine-tune examples
    with pytest.raises(ConfigError, match="finetune.batch_size"):
        loop.run(config, str(tmp_path / "w"))


def test_both_steps_and_epochs_is_an_error(data_dir):
    config = tiny_digits(data_dir)
    config.pretrain.epochs = 2
    with pytest.raises(ConfigError, match="pretrain.steps"):
        config_lib.validate(config)


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load"):
        config_lib.load_config_file(str(bad))
    r = cli("train", f"--config={bad}", f"--workdir={tmp_path}/w")
    assert r.returncode != 0 and "bad.py" in r.stderr


def test_unknown_command_and_missing_flags(tmp_path):
    r = cli("trian")
    assert r.returncode == 2 and "usage" in r.stderr
    r = cli("train", "--config=configs/digits.py:smoke")
    assert r.returncode == 2 and "--workdir is required" in r.stderr


def test_workdir_with_another_config_is_refused_and_untouched(data_dir, tmp_path):
    path = tmp_path / "run"
    loop.run(tiny_digits(data_dir, **{"pretrain.steps": 2, "finetune.steps": 1}), str(path))
    before = snapshot(path)
    other = tiny_digits(data_dir, **{"pretrain.steps": 2, "finetune.steps": 1, "seed": 3})
    other.optimizer.lr = 1e-4
    with pytest.raises(WorkdirError) as e:
        loop.run(other, str(path))
    assert "seed" in str(e.value) and "optimizer.lr" in str(e.value)
    assert snapshot(path) == before
    r = cli(
        "train",
        "--config=configs/digits.py:smoke",
        f"--workdir={path}",
        f"--config.data.data_dir={data_dir}",
    )
    assert r.returncode == 2 and "different config" in r.stderr and "pretrain.steps" in r.stderr
    assert snapshot(path) == before


def test_non_run_directory_is_refused(data_dir, tmp_path):
    path = tmp_path / "notes"
    path.mkdir()
    (path / "thesis.tex").write_text("precious")
    with pytest.raises(WorkdirError, match="holds no jaxrepro run"):
        loop.run(tiny_digits(data_dir), str(path))
    assert (path / "thesis.tex").read_text() == "precious"
    assert sorted(os.listdir(path)) == ["thesis.tex"]


def test_apply_override_parses_and_rejects(data_dir):
    config = tiny_digits(data_dir)
    config_lib.apply_override(config, "seeds.aug", "7")
    config_lib.apply_override(config, "optimizer.lr", "3e-4")
    config_lib.apply_override(config, "data.augment.flip.enabled", "false")
    assert config.seeds.aug == 7 and config.optimizer.lr == 3e-4
    assert config.data.augment.flip.enabled is False
    with pytest.raises(ConfigError, match="unknown config key"):
        config_lib.apply_override(config, "optimizer.lerning_rate", "1")
    with pytest.raises(ConfigError, match="expected float"):
        config_lib.apply_override(config, "optimizer.lr", "fast")
