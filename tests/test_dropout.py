"""model.dropout_rate: dropout before the classifier, keyed by the 'dropout' seed and the step.

Rate 0 (the default) must leave the program as it was: no random op in the model, so the
'dropout' seed changes nothing and a study refuses to vary it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rows_equal, tiny_digits

from jaxrepro import config as config_lib
from jaxrepro import models, rng, study
from jaxrepro.data.augment import default_augment_config
from jaxrepro.errors import ConfigError
from jaxrepro.train import loop
from jaxrepro.train import step as step_lib
from jaxrepro.workdir import Workdir

_RANDOM_PRIMS = ("random_bits", "threefry2x32")
_MEAN, _STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)


def _module(rate: float):
    return models.build(
        "resnet_tiny", 10, stem="cifar", conv_impl="matmul", bn_impl="fused", dropout_rate=rate
    )


def _batch(n: int = 8):
    r = np.random.default_rng(0)
    return {
        "image": r.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
        "label": r.integers(0, 10, n).astype(np.int32),
        "id": np.arange(n, dtype=np.int32),
        "epoch": np.zeros(n, np.int32),
    }


def _state(module, step: int):
    params, batch_stats = models.init_variables(module, rng.factor_root("init", 0), 16)
    tx = optax.adam(1e-3)
    return step_lib.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        nonfinite=jnp.asarray(0, jnp.int32),
    ), tx


def _step_fn(rate: float):
    module = _module(rate)
    _, tx = _state(module, 0)
    static = dict(
        module=module, tx=tx, lr_fn=lambda s: jnp.float32(1e-3), phase_start=0,
        augment_cfg=default_augment_config(), mean=_MEAN, std=_STD, policy="stop",
    )  # fmt: skip
    return functools.partial(step_lib.train_step, **static)


def _count_random(jaxpr) -> int:
    text = str(jaxpr)
    return sum(text.count(p) for p in _RANDOM_PRIMS)


def test_the_dropout_key_is_the_step_key_of_the_dropout_stream():
    root = rng.phase_root(rng.factor_root("dropout", 0), "pretrain")
    keys = {s: step_lib.dropout_rngs(_module(0.5), root, s)["dropout"] for s in (3, 4)}
    assert np.array_equal(rng.key_data(keys[3]), rng.key_data(rng.step_key(root, 3)))
    assert not np.array_equal(rng.key_data(keys[3]), rng.key_data(keys[4]))  # a mask a step
    assert step_lib.dropout_rngs(_module(0.0), root, 3) is None  # no key made, none used


def test_rate_zero_has_no_dropout_op_and_rate_above_zero_has_one():
    x = jnp.zeros((2, 16, 16, 3), jnp.float32)
    counts, evals = {}, {}
    for rate in (0.0, 0.5):
        module = _module(rate)
        params, stats = models.init_variables(module, rng.factor_root("init", 0), 16)
        v = {"params": params, "batch_stats": stats}
        key = jax.random.key(0, impl=rng.PRNG_IMPL)
        rngs = {"dropout": key} if rate else None
        counts[rate] = _count_random(
            jax.make_jaxpr(
                lambda v, m=module, r=rngs: m.apply(
                    v, x, train=True, mutable=["batch_stats"], rngs=r
                )
            )(v)
        )
        evals[rate] = str(jax.make_jaxpr(lambda v, m=module: m.apply(v, x))(v))
    assert counts[0.0] == 0 and counts[0.5] > 0
    # eval mode never drops: the same program with and without dropout
    assert evals[0.0] == evals[0.5] and _count_random(evals[0.0]) == 0
    # The whole train step: at rate 0 only the augmentation draws; at 0.5 dropout too.
    state, _ = _state(_module(0.0), 0)
    args = (
        state,
        _batch(),
        rng.factor_root("aug", 0),
        rng.factor_root("dropout", 0),
        step_lib.step_controls(),
    )
    jaxprs = {rate: jax.make_jaxpr(_step_fn(rate))(*args) for rate in (0.0, 0.5)}
    assert _count_random(jaxprs[0.0]) < _count_random(jaxprs[0.5])


@pytest.mark.parametrize(
    "value,needle",
    [(1.0, "must be < 1"), (-0.1, "must be >= 0"), (float("nan"), "must be finite")],
)
def test_dropout_rate_is_validated(data_dir, value, needle):
    config = tiny_digits(data_dir)
    config.model.dropout_rate = value
    with pytest.raises(ConfigError, match=f"model.dropout_rate: {needle}"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        _module(value)


def test_device_invariant_mode_refuses_dropout(data_dir):
    config = tiny_digits(data_dir, **{"model.dropout_rate": 0.5})
    config_lib.validate(config)  # fine without the invariant step
    config.determinism.device_invariant = True
    with pytest.raises(ConfigError, match="model.dropout_rate: 0.5 > 0 is not supported with"):
        config_lib.validate(config)
    from jaxrepro.train.invariant import grouped_model

    with pytest.raises(ValueError, match="device-invariant mode has no dropout"):
        grouped_model.check_module(_module(0.5))
    assert grouped_model.check_module(_module(0.0))


def test_a_stored_config_without_the_field_is_the_same_config(data_dir):
    current = config_lib.to_dict(tiny_digits(data_dir))
    stored = config_lib.to_dict(tiny_digits(data_dir))
    del stored["model"]["dropout_rate"]  # a config.json written before the option
    assert config_lib.diff(stored, current) == []
    current["model"]["dropout_rate"] = 0.5
    assert config_lib.diff(stored, current) == ["model.dropout_rate"]
    assert config_lib.from_dict(stored).model.dropout_rate == 0.0


def test_a_config_json_from_before_this_rounds_fields_still_resumes(data_dir):
    """The run directory of an earlier version (no portable mode, diagnosis or corrupt-record
    fields) holds the same config as today's defaults: it resumes, replays and compares."""
    current = config_lib.to_dict(tiny_digits(data_dir))
    stored = config_lib.to_dict(tiny_digits(data_dir))
    del stored["determinism"]["portable"], stored["diagnose"]
    del stored["data"]["on_corrupt"], stored["data"]["jpeg_draft"]
    assert config_lib.diff(stored, current) == []
    current["determinism"]["portable"] = True
    assert config_lib.diff(stored, current) == ["determinism.portable"]


def test_study_refuses_to_vary_dropout_without_dropout(data_dir, tmp_path):
    config = tiny_digits(data_dir)
    out = tmp_path / "out"
    for vary in ("dropout", "aug,dropout", "aug*dropout"):
        with pytest.raises(ConfigError, match="--vary includes 'dropout' but model.dropout_rate"):
            study.run_study(config, str(out), vary=vary, seeds="0-1", jobs_only=True)
    assert not out.exists()  # refused before anything was written
    # 'all' leaves dropout out at rate 0, keeps it with dropout
    spec = study.make_spec("all", "0-1", config=config)
    assert spec.factors == tuple(f for f in rng.FACTORS if f != "dropout")
    runs = study.plan_runs(config, spec)
    assert not any("dropout" in r.seeds for r in runs)
    with_dropout = tiny_digits(data_dir, **{"model.dropout_rate": 0.25})
    assert study.make_spec("all", "0-1", config=with_dropout).factors == rng.FACTORS
    runs = study.plan_runs(with_dropout, study.make_spec("dropout", "0-1", config=with_dropout))
    assert [r.seeds for r in runs] == [{"dropout": 0}, {"dropout": 1}]
    # a grid point without dropout is refused, naming the point
    spec = study.make_spec("dropout", "0-1", ["model.dropout_rate=0.25,0.0"], with_dropout)
    with pytest.raises(ConfigError, match="grid point model.dropout_rate=0.0: --vary includes"):
        study.plan_runs(with_dropout, spec)


def test_engine_runs_with_dropout_differ_by_dropout_seed_and_repeat_bitwise(data_dir, tmp_path):
    overrides = {"model.dropout_rate": 0.5, "pretrain.steps": 3, "finetune.steps": 0}
    infos, rows = [], []
    for i, seed in enumerate((0, 1, 0)):
        cfg = tiny_digits(data_dir, **overrides, **{"seeds.dropout": seed})
        infos.append(loop.run(cfg, str(tmp_path / f"run{i}")))
        rows.append(Workdir(str(tmp_path / f"run{i}")).metrics())
    assert [i["status"] for i in infos] == ["done"] * 3
    assert infos[0]["init_param_hash"] == infos[1]["init_param_hash"]
    assert rows_equal(rows[0], rows[2])  # the same dropout seed: the same bits
    assert infos[0]["final_param_hash"] == infos[2]["final_param_hash"]
    train = [[r for r in rs if r["kind"] == "train"] for rs in rows]
    assert train[0][0]["loss"] != train[1][0]["loss"]  # step 0 already draws another mask
    assert infos[0]["final_param_hash"] != infos[1]["final_param_hash"]
    first_eval = [next(r for r in rs if r["kind"] == "eval") for rs in rows]
    assert first_eval[0]["step"] == 0 and first_eval[0] == first_eval[1]  # eval never drops
