"""``jaxrepro bench`` at tiny sizes: the JSON it writes is complete and consistent.

Benchmarks are not tests: nothing here asserts a speed, only that the numbers are there,
positive, and agree with each other.
"""

import json
import os
import statistics
import types

import numpy as np
import pytest

from jaxrepro import bench
from jaxrepro.bench import model as bench_model
from jaxrepro.bench import runs as bench_runs
from jaxrepro.bench import speed as bench_speed
from jaxrepro.bench import step as step_bench
from jaxrepro.errors import JaxreproError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "digits.py") + ":smoke"


def _flags(out):
    return types.SimpleNamespace(out=str(out))


def test_options_are_typed_and_checked():
    opts = bench.parse_options(["rounds=3", "arch=resnet18"], bench.STEP_DEFAULTS)
    assert opts["rounds"] == 3 and opts["arch"] == "resnet18" and opts["iters"] == 3
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_options(["rounds"], bench.STEP_DEFAULTS)
    with pytest.raises(ValueError, match="unknown bench option 'round'"):
        bench.parse_options(["round=3"], bench.STEP_DEFAULTS)
    with pytest.raises(ValueError, match="rounds=.*int"):
        bench.parse_options(["rounds=many"], bench.STEP_DEFAULTS)
    assert bench.int_list("32,224", "size") == [32, 224]
    with pytest.raises(ValueError, match="positive"):
        bench.int_list("0", "size")


def test_cli_errors_name_the_problem(tmp_path):
    with pytest.raises(JaxreproError, match="sub-command"):
        bench.main([], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="unknown bench sub-command 'stpe'"):
        bench.main(["stpe"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="rounds"):
        bench.main(["step", "rounds=x"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="same length"):
        bench.main(["step", "size=16,32", "batch=4", "torch=0", "peak_n=64"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="init="):
        bench.main(["startup", "init=lazy"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="conv_impl/bn_impl"):
        bench.main(["step", "variants=matmul/flax/fast"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="compare='tb'; valid: '' or tensorboard"):
        bench.main(["e2e", "compare=tb"], _flags(tmp_path))
    assert not os.path.exists(tmp_path / "step.json")


def test_speed_options_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(JaxreproError, match="dtype='float16'"):
        bench.main(["speed", "dtype=float16"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="deterministic='yes'"):
        bench.main(["speed", "deterministic=yes"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="batch"):
        bench.main(["speed", "batch=0"], _flags(tmp_path))
    with pytest.raises(JaxreproError, match="torch_variants=.*unknown \\['compile'\\]"):
        bench.main(["step", "torch_variants=channels_last,compile"], _flags(tmp_path))
    assert os.listdir(tmp_path) == []
    opts, pairs = bench_speed.settings(dict(bench_speed.DEFAULTS, tiny=1, deterministic="1,0"))
    assert (opts["arch"], opts["size"], opts["batch"]) == ("resnet_tiny", 32, 8)
    assert pairs == [("float32", True), ("float32", False)]


def _timed(step_s: dict) -> tuple[dict, dict]:
    """A step.json row and its per-round times: each runner's rounds of 3 equal steps."""
    times = {name: [[t] * 3 for t in per_round] for name, per_round in step_s.items()}
    medians = {name: statistics.median(per_round) for name, per_round in step_s.items()}
    row = {name: {"step_s_median": m, "images_per_s": 32 / m} for name, m in medians.items()}
    return row, times


def test_headline_ratio_is_against_the_fastest_torch_variant():
    row, times = _timed(
        {"jax": [0.10, 0.12, 0.10], "torch": [0.15, 0.18, 0.16],
         "torch[channels_last]": [0.16, 0.19, 0.17], "torch[compiled]": [0.12, 0.13, 0.12]}
    )  # fmt: skip
    got = step_bench.headline(row, times)
    assert got["torch_best"] == "torch[compiled]"
    assert got["ratio_per_round"] == pytest.approx([1.2, 13 / 12, 1.2])
    assert got["ratio_jax_over_torch"] == pytest.approx(1.2)
    assert got["ratio_of_medians"] == pytest.approx(0.12 / 0.10)
    assert got["ratios_by_torch_variant"]["torch"] == pytest.approx(1.5)
    assert set(got["ratios_by_torch_variant"]) == {
        "torch",
        "torch[channels_last]",
        "torch[compiled]",
    }
    row, times = _timed({"jax": [0.1], "torch": [0.2], "torch[channels_last]": [0.3]})
    assert step_bench.headline(row, times)["torch_best"] == "torch"  # the default may be best


def test_load_verdict_says_when_the_machine_was_busy():
    quiet = {"loadavg": [1.2, 1, 1], "loadavg_after": [1.4, 1, 1]}
    assert step_bench.load_verdict(quiet, cpus=2) == {
        "measured_under_load": False,
        "load_threshold": 1.5,
    }
    busy = step_bench.load_verdict({"loadavg": [1.2, 1, 1], "loadavg_after": [2.5, 1, 1]}, cpus=2)
    assert busy["measured_under_load"] and "up to 2.50 on a 2-CPU machine" in busy["load_note"]


def test_torch_runner_variants():
    torch = pytest.importorskip("torch")
    run, info = step_bench.torch_step_runner("resnet_tiny", 16, 2, 10, 1, "channels_last")
    run()
    assert info["layout"] == "NHWC (channels_last)" and info["variant"] == "channels_last"
    assert torch.get_num_threads() == info["threads"] == 1
    with pytest.raises(ValueError, match="unknown PyTorch variant 'nhwc'"):
        step_bench.torch_step_runner("resnet_tiny", 16, 2, 10, 1, "nhwc")


def test_resnet50_flops_match_the_published_count():
    flops = bench_model.model_flops("resnet50", 224, num_classes=1000)
    # torchvision: 4.09 G multiply-adds for ResNet-50 at 224x224
    assert 2 * 4.08e9 < flops["forward"] < 2 * 4.11e9
    assert flops["train"] == 3 * flops["forward"]


def test_alternate_times_each_turn_after_its_settling_steps():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    cpu = {}
    times = bench.alternate(runners, rounds=2, iters=3, cpu=cpu, settle=1)
    assert calls == (["a"] * 4 + ["b"] * 4) * 2  # 1 untimed + 3 timed, per turn
    assert [len(r) for r in times["a"]] == [3, 3] and [len(r) for r in cpu["b"]] == [3, 3]
    with pytest.raises(ValueError, match="settle"):
        bench.alternate(runners, rounds=1, iters=1, settle=-1)


@pytest.mark.slow  # a benchmark's smoke run: make test-slow
def test_bench_step_writes_consistent_json(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler():  # torch.compile takes minutes: never in the tests
        raise RuntimeError("no g++ on PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    args = ["step", "arch=resnet_tiny", "size=16", "batch=4", "rounds=2", "iters=2", "warmup=1",
            "peak_n=128", "variants=matmul/flax/cond", "threads=1",
            "torch_variants=channels_last,compiled"]  # fmt: skip
    assert bench.main(args, _flags(tmp_path)) == 0
    result = json.loads((tmp_path / "step.json").read_text())
    mp = result["matmul_peak"]
    per_core = max(mp["numpy_gflops_per_core_cpu"], mp["jax_gflops_per_core_cpu"])
    assert mp["peak_gflops"] == max(mp["numpy_gflops"], mp["jax_gflops"], per_core * mp["cores"])
    peak = mp["peak_gflops"] * 1e9
    (row,) = result["shapes"]
    assert (row["image_size"], row["batch"]) == (16, 4)
    assert row["flops_per_image"]["train"] == 3 * row["flops_per_image"]["forward"] > 0
    assert "no C++ compiler" in row["torch[compiled]"]["skipped"]
    for name in ("jax", "jax[matmul/flax/cond]", "torch", "torch[channels_last]"):
        r = row[name]
        assert len(r["rounds_s"]) == 2 and all(len(x) == 2 for x in r["rounds_s"])
        times = [t for x in r["rounds_s"] for t in x]
        assert min(times) > 0 and r["step_s_median"] == pytest.approx(statistics.median(times))
        assert r["images_per_s"] == pytest.approx(4 / r["step_s_median"])
        want = r["images_per_s"] * row["flops_per_image"]["train"] / peak
        assert r["fraction_of_peak"] == pytest.approx(want)
    assert row["jax"]["conv_impl"] == "matmul" and row["jax"]["tail"] == "project"
    assert row["jax[matmul/flax/cond]"]["tail"] == "cond"
    assert row["torch[channels_last]"]["layout"] == "NHWC (channels_last)"
    best = row["torch_best"]
    assert best == min(("torch", "torch[channels_last]"), key=lambda n: row[n]["step_s_median"])
    ratios = [
        statistics.median(t) / statistics.median(j)
        for j, t in zip(row["jax"]["rounds_s"], row[best]["rounds_s"], strict=True)
    ]
    assert row["ratio_per_round"] == pytest.approx(ratios)
    assert row["ratio_jax_over_torch"] == pytest.approx(statistics.median(ratios))
    assert row["ratio_jax_over_torch"] > 0
    assert row["ratio_of_medians"] == pytest.approx(
        row["jax"]["images_per_s"] / row[best]["images_per_s"]
    )
    assert set(row["ratios_by_torch_variant"]) == {"torch", "torch[channels_last]"}
    assert isinstance(result["machine"]["measured_under_load"], bool)
    assert result["machine"]["cores"] >= 1 and row["torch"]["threads"] >= 1
    assert "glibc_tunables" in result["machine"]


@pytest.mark.slow  # a benchmark's smoke run: make test-slow
def test_bench_speed_measures_each_setting_in_its_own_process(tmp_path):
    args = ["speed", "tiny=1", "dtype=float32", "deterministic=1,0"]
    assert bench.main(args, _flags(tmp_path)) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    on, off = result["settings"]
    assert (on["deterministic"], off["deterministic"]) == (True, False)
    for r in (on, off):
        assert r["arch"] == "resnet_tiny" and r["steps"] == 3 and r["images_per_s"] > 0
        assert r["images_per_s"] == pytest.approx(8 * 1000 / r["step_ms"], rel=1e-3)
        assert np.isfinite(r["final_loss"])
    # deterministic GPU mode changes nothing on a CPU: the same step, the same bits
    assert on["param_hash"] == off["param_hash"]
    assert on["determinism"]["requested"]["gpu_deterministic"] is True
    assert off["determinism"]["requested"]["gpu_deterministic"] is False


@pytest.mark.slow  # a benchmark's smoke run: make test-slow
def test_bench_e2e_smoke(tmp_path, data_dir):
    opts = dict(bench_runs.E2E_DEFAULTS, config=SMOKE, steps=9, warmup=2, rounds=1,
                data_dir=data_dir, set="checkpoint.every=4;pretrain.eval_every=4")  # fmt: skip
    result = bench_runs.bench_e2e(opts)
    (run,) = result["rounds"]["run"]
    (noc,) = result["rounds"]["run_no_checkpoints"]
    assert run["status"] == "done"
    # measured between evals (where every earlier step has finished): from the first at
    # or after the warmup to the final one, the eval at 8 left out
    assert run["window"] == "evals at steps 4..9" and run["steps"] == 5
    # every 4 steps, keep_last 3, plus 0: the checkpoint before the earliest onset an
    # episode not yet confirmed could still get (the detector's pending_from) is kept;
    # without the cadence only the phase start and the end
    assert run["checkpoints"] == [0, 4, 8, 9] and noc["checkpoints"] == [0, 9]
    assert run["eval_s"] > 0 and run["steps_per_s_excl_eval"] >= run["steps_per_s"] > 0
    assert result["efficiency_excl_eval"] == pytest.approx(
        run["steps_per_s_excl_eval"] / result["bare_steps_per_s"]
    )
    # time per step with checkpoints over time per step without them
    assert result["checkpoint_overhead_ratio"] == pytest.approx(
        noc["steps_per_s"] / run["steps_per_s"]
    )
    assert result["checkpoint_overhead_per_round"] == [result["checkpoint_overhead_ratio"]]
    cpu = result["cpu_s_per_step"]
    assert result["checkpoint_overhead_ratio_cpu"] == pytest.approx(
        cpu["run_excl_eval"] / cpu["run_no_checkpoints_excl_eval"]
    )
    assert cpu["run_excl_eval"] == run["cpu_s_per_step_excl_eval"] > 0
    assert result["efficiency_cpu"] == pytest.approx(cpu["bare"] / cpu["run_excl_eval"])
    (rep,) = result["rounds"]["replay"]
    assert rep["from_step"] == 8 and rep["steps"] == 1 and rep["bitwise_equal"]
    assert result["replay_over_original"] == pytest.approx(
        rep["replay_total_s"] / rep["original_steps_s"]
    )


@pytest.mark.slow  # a benchmark's smoke run: make test-slow
def test_bench_e2e_tensorboard_on_off_side_by_side(tmp_path, data_dir):
    opts = dict(bench_runs.E2E_DEFAULTS, config=SMOKE, steps=9, warmup=2, rounds=2,
                data_dir=data_dir, set="checkpoint.every=4;pretrain.eval_every=4",
                compare="tensorboard")  # fmt: skip
    result = bench_runs.bench_e2e(opts)
    assert result["kind"] == "e2e_tensorboard"
    on, off = result["rounds"]["on"], result["rounds"]["off"]
    assert len(on) == len(off) == len(result["rounds"]["bare"]) == 2
    # event files only where they are on; the order alternates round by round
    assert all(r["event_files"] == 1 for r in on) and all(r["event_files"] == 0 for r in off)
    assert [r["order"] for r in on] == [0, 1] and [r["order"] for r in off] == [1, 0]
    pairs = zip(on, off, strict=True)
    ratios = [o["steps_per_s_excl_eval"] / n["steps_per_s_excl_eval"] for n, o in pairs]
    assert result["on_over_off_per_round"] == pytest.approx(ratios)
    assert result["on_over_off"] == pytest.approx(statistics.median(ratios))
    assert result["on_over_off_spread"] == pytest.approx([min(ratios), max(ratios)])
    assert all(r["status"] == "done" and r["window"] == "evals at steps 4..9" for r in on + off)
    # the writer's own time: some in each run that writes, none where it is off
    assert all(r["event_writer_s"]["calls"] > 0 and r["event_writer_s"]["wall_s"] > 0 for r in on)
    assert all(r["event_writer_s"] == {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0} for r in off)
    assert 0 < result["event_writer_share_of_run"] < 1


def test_bench_checkpoint_smoke(data_dir):
    opts = dict(bench_runs.CHECKPOINT_DEFAULTS, config=SMOKE, rounds=2, data_dir=data_dir)
    result = bench_runs.bench_checkpoint(opts)  # raises unless each restore is bit for bit
    assert result["state"]["arrays"] > 10 and result["state"]["mib"] > 0
    for layout in bench_runs.CHECKPOINT_LAYOUTS:
        rows = result["rounds"][layout]
        assert len(rows) == 2
        for row in rows:
            assert 0 < row["save_held_s"] <= row["save_total_s"] and row["restore_s"] > 0
            assert row["save_cpu_s"] == pytest.approx(row["save_user_s"] + row["save_system_s"])
    for other in ("orbax-packed", "leaves"):
        ratios = [
            b["save_total_s"] / a["save_total_s"]
            for a, b in zip(result["rounds"]["raw"], result["rounds"][other], strict=True)
        ]
        key = f"{other.replace('-', '_')}_over_raw"
        assert result[key]["save_total_s"] == pytest.approx(np.median(ratios))
    with pytest.raises(ValueError, match="rounds"):
        bench_runs.bench_checkpoint(dict(opts, rounds=0))


def test_median_ratio_of_a_zero_measurement_is_none():
    # A small state's save can take less CPU time than the clock resolves: the ratio over
    # it has no value, and the bench must still write its other figures.
    num = [{"t": 2.0}, {"t": 6.0}, {"t": 3.0}]
    assert bench_runs._median_ratio(num, [{"t": 1.0}, {"t": 2.0}, {"t": 1.0}], "t") == 3.0
    assert bench_runs._median_ratio(num, [{"t": 1.0}, {"t": 0.0}, {"t": 1.0}], "t") is None
    with pytest.raises(ValueError):
        bench_runs._median_ratio(num, [{"t": 1.0}], "t")


@pytest.mark.slow  # a benchmark's smoke run: make test-slow
def test_bench_startup_cold_then_warm(data_dir):
    opts = dict(bench_runs.STARTUP_DEFAULTS, config=SMOKE, init="fast", runs=2,
                data_dir=data_dir)  # fmt: skip
    result = bench_runs.bench_startup(opts)
    assert result["machine"]["cores"] >= 1 and "glibc_tunables" in result["machine"]
    cold, warm = result["results"]["fast"]
    assert (cold["cache"], warm["cache"]) == ("cold", "warm")
    for r in (cold, warm):
        assert 0 < r["python_start_s"] < r["time_to_first_step_s"] < r["process_exit_s"]
        assert r["calls"]["init"] >= 1 and r["seconds"]["step_trace_compile"] > 0
    # cold: nearly everything is compiled (a program compiled twice in one run may hit)
    assert cold["compiles"]["cache_hits"] < cold["compiles"]["backend_compiles"] / 2
    # the second run of the same config compiles nothing: every program is a cache hit
    assert warm["compiles"]["cache_hits"] == warm["compiles"]["backend_compiles"] >= 1
    assert warm["compiles"]["compile_time_saved_s"] > 0


def test_bench_memory_refuses_an_empty_list():
    with pytest.raises(ValueError, match="configs"):
        bench_runs.bench_memory({"configs": "", "data_dir": ""})


def test_recorded_results_hold_no_absolute_data_dir(tmp_path):
    data = str(tmp_path / "cache" / "tfds")
    result = {"kind": "startup", "options": {"data_dir": data, "runs": 2}, "results": {}}
    written = bench.recorded(result)
    assert written["options"] == {"data_dir": ".../tfds", "runs": 2}
    assert str(tmp_path) not in json.dumps(written)
    assert result["options"]["data_dir"] == data  # the caller's dict is left alone
    relative = {"options": {"data_dir": "data/tfds"}}
    assert bench.recorded(relative) == relative
