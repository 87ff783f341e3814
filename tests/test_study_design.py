"""Study design files: parsing, arms in the plan, bad input refused before anything is
written, the disk estimate and refusal, checkpoint retention, and a design study with a
branch arm interrupted after its baseline run and resumed (smoke size)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, TINY, snapshot, tiny_digits

from jaxrepro import config as config_lib
from jaxrepro import dropoff, study
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.errors import ConfigError
from jaxrepro.plumbing import jsonio
from jaxrepro.study import design as design_lib
from jaxrepro.study import disk

PAPER = os.path.join(REPO, "configs", "studies", "paper.py")


def _design_file(tmp_path, arms, name="d.py", **top) -> str:
    """A design file holding ``arms`` (and top-level keys) as a Python literal."""
    path = tmp_path / name
    body = dict(top, arms=arms)
    path.write_text(f"def get_design(variant=None):\n    return {body!r}\n")
    return str(path)


TINY_ARMS = [
    {"name": "pad4", "vary": "aug", "seeds": "0-1"},
    {"name": "pad3", "overrides": {"data.augment.crop.padding": 3}},
    {"name": "zero", "vary": "init", "overrides": {"model.zero_init_residual": True}},
    {"name": "clip", "branch": "finetune", "overrides": {"optimizer.clip_norm": 1.0}},
]


# ----------------------------------------------------------------------------- parsing


def test_the_paper_design_has_its_arms_with_eight_seeds_each():
    d = design_lib.load(PAPER)
    names = [a.name for a in d.arms]
    assert names[:2] == ["pad4", "pad3"] and d.baseline.name == "pad4"
    assert {"init", "zero_init_residual", "lr_half", "warmup", "clip"} <= set(names)
    for arm in d.arms:
        assert len(arm.seeds) >= 8, arm.name
    by = {a.name: a for a in d.arms}
    assert dict(by["pad3"].overrides)["data.augment.crop.padding"] == "3"
    assert dict(by["zero_init_residual"].overrides)["model.zero_init_residual"] == "True"
    assert by["init"].factors == ("init",) and by["pad3"].factors == ("aug",)
    remedies = [a for a in d.arms if a.branch]
    assert {a.name for a in remedies} == {"lr_half", "warmup", "clip"}
    assert all(a.branch == "finetune" and a.factors == ("aug",) for a in remedies)
    recipe = config_lib.load_config_file(os.path.join(REPO, "configs", "digits.py"))
    ft_lr = recipe.finetune.lr or recipe.optimizer.lr
    assert float(dict(by["lr_half"].overrides)["finetune.lr"]) == pytest.approx(ft_lr / 2)
    assert d.config == os.path.join(REPO, "configs", "digits.py")
    quick = design_lib.load(PAPER + ":quick")
    assert [(a.name, a.seeds) for a in quick.arms] == [("pad4", (0, 1, 2)), ("pad3_ft", (0, 1, 2))]
    assert quick.arms[1].branch == "finetune"


def test_plan_of_a_design_names_arms_and_branches(data_dir, tmp_path):
    config = tiny_digits(data_dir)
    d = design_lib.load(_design_file(tmp_path, TINY_ARMS))
    runs = design_lib.plan_design(config, d)
    assert [(r.name, r.arm) for r in runs] == [
        ("pad4_aug0", "pad4"),
        ("pad4_aug1", "pad4"),
        ("pad3_aug0", "pad3"),
        ("pad3_aug1", "pad3"),
        ("zero_init0", "zero"),
        ("zero_init1", "zero"),
        ("clip_aug0", "clip"),
        ("clip_aug1", "clip"),
    ]
    by = {r.name: r for r in runs}
    # arms default to the baseline's factors and seeds; a branch restores the baseline run
    # of its seed at the fine-tune start (8 pretrain steps), which keeps that checkpoint
    assert by["clip_aug1"].branch == {"run": "pad4_aug1", "from_step": 8, "at": "finetune"}
    assert by["clip_aug1"].overrides == (("optimizer.clip_norm", "1.0"),)
    assert ("checkpoint.keep_phase_starts", "True") in by["pad4_aug0"].overrides
    assert all(
        "checkpoint.keep_phase_starts" not in dict(by[n].overrides) for n in by if "pad3" in n
    )
    assert ("data.augment.crop.padding", "3") in by["pad3_aug0"].overrides
    assert ("seeds.init", "1") in by["zero_init1"].overrides
    # the jobs: a branch is a replay of its baseline run into its own runs/NAME
    out = str(tmp_path / "s")
    res = study.run_study(config, out, design=_design_file(tmp_path, TINY_ARMS), jobs_only=True)
    lines = open(res["jobs"]).read().splitlines()
    clip = lines[res["runs"].index("clip_aug0")]
    assert " replay --workdir=runs/pad4_aug0 --from_step=8 " in clip
    assert "--out=runs/clip_aug0 --override=optimizer.clip_norm=1.0 " in clip
    stored = jsonio.read_json(os.path.join(out, study.STUDY_FILE))
    assert stored["spec"]["design"] == "arms" and stored["spec"]["baseline"] == "pad4"
    assert [a["name"] for a in stored["spec"]["arms"]] == ["pad4", "pad3", "zero", "clip"]
    assert study.plan.planned_runs(stored) == [(r.name, r.arm) for r in runs]
    # --arms selects; the same out dir with other arms is another study
    sub = study.run_study(
        config, str(tmp_path / "t"), design=_design_file(tmp_path, TINY_ARMS), arms="pad4,pad3",
        jobs_only=True,
    )  # fmt: skip
    assert sub["runs"] == ["pad4_aug0", "pad4_aug1", "pad3_aug0", "pad3_aug1"]


# ----------------------------------------------------------------------------- bad input


def _arms(*changes):
    """TINY_ARMS with arm i's keys replaced: (i, {key: value})."""
    arms = [dict(a) for a in TINY_ARMS]
    for i, change in changes:
        arms[i] = dict(arms[i], **change)
    return arms


@pytest.mark.parametrize(
    "arms, top, kw, needle",
    [
        (TINY_ARMS, {}, dict(arms="pad4,nope"), "--arms: no arm named 'nope'"),
        (TINY_ARMS, {}, dict(arms="clip"), "name it too"),
        (TINY_ARMS, {"sweep": 1}, {}, "unknown key(s) 'sweep'; known: config"),
        (_arms((1, {"seed": "0-3"})), {}, {}, "arm 'pad3': unknown key(s) 'seed'"),
        (
            _arms((1, {"overrides": {"data.augment.crop.padding": "abc"}})),
            {},
            {},
            "arm 'pad3': override data.augment.crop.padding='abc': expected int",
        ),
        (
            _arms((1, {"overrides": {"data.augment.crop.pad": 3}})),
            {},
            {},
            "unknown config key 'data.augment.crop.pad'",
        ),
        (
            _arms((1, {"overrides": {"data.augment.crop.padding": -1}})),
            {},
            {},
            "arm 'pad3': config field data.augment.crop.padding: must be >= 0",
        ),
        (
            _arms((3, {"overrides": {"model.width": 4}})),
            {},
            {},
            "override model.width would change the architecture mid-run",
        ),
        (
            _arms((3, {"overrides": {"data.image_size": 8}})),
            {},
            {},
            "override data.image_size would change the architecture mid-run",
        ),
        (
            _arms((3, {"overrides": {"pretrain.steps": 4}})),
            {},
            {},
            "override pretrain.steps changes pretraining",
        ),
        (
            _arms((3, {"overrides": {"data.normalize.std": (0.5, 0.5, 0.5)}})),
            {},
            {},
            "cannot change at the pretrain -> fine-tune boundary",
        ),
        (
            _arms((3, {"overrides": {"finetune.new_head": False}})),
            {},
            {},
            "override finetune.new_head cannot change at the pretrain -> fine-tune",
        ),
        (_arms((3, {"seeds": "0-2"})), {}, {}, "seed(s) 2 have no baseline run"),
        (_arms((3, {"vary": "init"})), {}, {}, "so it varies its factors (aug), not init"),
        (_arms((3, {"branch": "pretrain"})), {}, {}, "branch='pretrain'; known"),
        (_arms((0, {"branch": "finetune"})), {}, {}, "the baseline and cannot be a branch"),
        (_arms((2, {"name": "pad3"})), {}, {}, "two arms are named 'pad3'"),
        (_arms((1, {"name": "pad 3"})), {}, {}, "needs a 'name' of letters"),
        (TINY_ARMS, {}, dict(vary="aug"), "--design names its arms' factors"),
    ],
)
def test_bad_design_input_is_refused_before_anything_is_written(
    data_dir, tmp_path, arms, top, kw, needle
):
    path = _design_file(tmp_path, arms, **top)
    out = tmp_path / "s"
    with pytest.raises(ConfigError) as e:
        study.run_study(tiny_digits(data_dir), str(out), design=path, **kw)
    assert needle in str(e.value)
    assert not out.exists()


def test_bad_design_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        design_lib.load(str(tmp_path / "none.py"))
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        design_lib.load(PAPER + ":huge")
    (tmp_path / "x.py").write_text("X = 1\n")
    with pytest.raises(ConfigError, match="defines no get_design"):
        design_lib.load(str(tmp_path / "x.py"))


def test_a_remedy_of_optimizer_lr_that_finetune_lr_overrides_is_refused(data_dir, tmp_path):
    arms = _arms((3, {"overrides": {"optimizer.lr": 1e-4}}))
    config = tiny_digits(data_dir, finetune__lr=1e-3)
    with pytest.raises(ConfigError, match="changes nothing in fine-tuning"):
        study.run_study(config, str(tmp_path / "s"), design=_design_file(tmp_path, arms))
    arms = _arms((3, {"overrides": {"optimizer.warmup_steps": 20}}))
    config = tiny_digits(data_dir, finetune__warmup_steps=0)
    with pytest.raises(ConfigError, match="finetune.warmup_steps=0; override finetune"):
        study.run_study(config, str(tmp_path / "s"), design=_design_file(tmp_path, arms))
    assert not (tmp_path / "s").exists()


def test_cli_unknown_arm_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "s"
    r = subprocess.run(
        [sys.executable, "-m", "jaxrepro", "study", f"--design={PAPER}:quick", "--arms=pad5",
         f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", JAXREPRO_COMPILE_CACHE="0"),
    )  # fmt: skip
    assert r.returncode == 2
    assert "error: --arms: no arm named 'pad5'" in r.stderr and "known: pad4, pad3" in r.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- disk


def _run(name, steps_from=None):
    branch = None if steps_from is None else {"run": "a", "from_step": steps_from}
    return study.Run(name, "x", {}, (), "x", branch)


def test_worst_case_sums_what_each_policy_can_hold():
    shape = {"bytes": 10, "steps": [0, 4, 8, 9, 12, 14]}  # 6 checkpoints, the phase at 9
    runs = [_run("a"), _run("b"), _run("c", steps_from=9)]  # c: a branch of a from 9
    shapes = dict.fromkeys(("a", "b", "c"), shape)
    w = disk.worst_case(runs, shapes, "all", parallel=1, diagnose=1, replay=True)
    assert w["worst_case_bytes"] == (6 + 6 + 3) * 10 + 6 * 10  # + the replay's own
    assert w["checkpoint_bytes"] == 10
    w = disk.worst_case(runs, shapes, "needed", parallel=1, diagnose=2, replay=False)
    # one running run at full size (5 beyond its last), a last one each, 2 diagnosed
    # events' checkpoints, the branched-from run's fine-tune start
    assert w["worst_case_bytes"] == 5 * 10 + 3 * 10 + 2 * 10 + 1 * 10
    w2 = disk.worst_case(runs, shapes, "needed", parallel=2, diagnose=2, replay=False)
    assert w2["worst_case_bytes"] == w["worst_case_bytes"] + 5 * 10


def test_checkpoint_size_is_the_train_state_of_the_config(data_dir):
    config = tiny_digits(data_dir)
    shape = disk.run_shape(config)
    from jaxrepro.train.setup import RunSetup

    state = jax.eval_shape(RunSetup(config).init_state)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    stats = sum(x.size for x in jax.tree.leaves(state.batch_stats))
    # float32 weights and BatchNorm statistics, Adam's two moments, and four int32
    # counters (step, non-finite steps, Adam's and the schedule's counts)
    assert shape["bytes"] == 4 * (3 * params + stats) + 4 * 4
    assert shape["steps"] == [0, 4, 8, 12, 14] and shape["phases"]["finetune"]["start"] == 8
    clipped = study.copy_config(config)
    clipped.optimizer.clip_norm = 1.0
    assert disk.run_shape(clipped)["bytes"] == shape["bytes"]  # clipping adds no arrays


def test_a_study_whose_worst_case_does_not_fit_refuses_to_start(data_dir, tmp_path, monkeypatch):
    config = tiny_digits(data_dir)
    path = _design_file(tmp_path, TINY_ARMS)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1_000_000)
    out = tmp_path / "s"
    with pytest.raises(disk.DiskError) as e:
        study.run_study(config, str(out), design=path)
    shape = disk.run_shape(config)
    runs = design_lib.plan_design(config, design_lib.load(path))
    need = disk.worst_case(runs, dict.fromkeys([r.name for r in runs], shape), "needed", 1)
    text = str(e.value)
    assert text.startswith("refusing to start: the study may hold up to ")
    assert disk.human(need["worst_case_bytes"]) in text and "1.0 MB are free" in text
    assert not out.exists()
    # a study that already holds checkpoints needs only the rest: the same refusal names it
    os.makedirs(out / "runs" / "pad4_aug0" / "checkpoints" / "4")
    (out / "runs" / "pad4_aug0" / "checkpoints" / "4" / "x").write_bytes(b"\0" * 500_000)
    before = snapshot(str(out))
    with pytest.raises(disk.DiskError, match=r"it holds 500 KB already"):
        study.run_study(config, str(out), design=path)
    assert snapshot(str(out)) == before


# ----------------------------------------------------------------------------- retention


def _fake_finished(out, name, steps, events):
    """A finished run with tiny checkpoints at ``steps`` and drop-offs at (step, severity)."""
    wd = os.path.join(out, "runs", name)
    os.makedirs(wd)
    jsonio.write_json(os.path.join(wd, "run.json"), {"status": "done"})
    rows = [
        {"index": i, "step": s, "phase": "pretrain", "metric": "loss", "kind": "spike",
         "severity": sev}
        for i, (s, sev) in enumerate(events)
    ]  # fmt: skip
    dropoff.write_dropoffs(wd, rows)
    ckpts = Checkpoints(os.path.join(wd, "checkpoints"))
    for s in steps:
        ckpts.save(s, {"w": np.full(4, s, np.float32)}, {"phase": "pretrain"})
    ckpts.wait()
    ckpts.close()
    return rows


def _steps(out, name):
    c = Checkpoints(os.path.join(out, "runs", name, "checkpoints"), read_only=True)
    try:
        return c.steps()
    finally:
        c.close()


def test_needed_retention_keeps_exactly_what_replay_diagnoses_and_branches_need(tmp_path):
    out = str(tmp_path)
    steps = [0, 4, 8, 12, 16]
    runs = [_run("a"), _run("b"), _run("c"), study.Run("br", "x", {}, (), "x",
            {"run": "a", "from_step": 8})]  # fmt: skip
    _fake_finished(out, "a", steps, [(6, 0.5), (14, 0.2)])
    _fake_finished(out, "b", steps, [(10, 0.9)])
    _fake_finished(out, "c", steps, [(3, 0.1)])
    keep = dict(diagnose=1, replay=True)
    # b's event is the most severe (replay and diagnosis); a keeps its fine-tune start (8)
    # while its branch has not finished; every run keeps its last checkpoint
    pruned = disk.prune(out, runs, "needed", **keep)
    assert {n: _steps(out, n) for n in "abc"} == {"a": [8, 16], "b": [8, 16], "c": [16]}
    assert pruned["c"] == {"kept": [16], "deleted": [0, 4, 8, 12]}
    total = disk.merge_pruned({}, pruned)
    # dropoffs keeps the checkpoint before every drop-off still there (c's at 0 is gone)
    # once the branch is done, a's fine-tune start goes; a diagnosed and replayed event's
    # checkpoint goes after the analysis
    os.makedirs(os.path.join(out, "runs", "br"))
    jsonio.write_json(os.path.join(out, "runs", "br", "run.json"), {"status": "done"})
    from jaxrepro.diagnose import engine

    event = dropoff.load_dropoffs(os.path.join(out, "runs", "b"))[0]
    where = os.path.join(out, "runs", "b", engine.DIR, engine.event_name(0, event))
    os.makedirs(where)
    jsonio.write_json(os.path.join(where, "diagnosis.json"), {})
    replayed = os.path.join(out, "runs", "b", "replays", study.analysis.REPLAY_NAME)
    os.makedirs(replayed)
    jsonio.write_json(os.path.join(replayed, "replay_summary.json"), {"event": event})
    disk.merge_pruned(total, disk.prune(out, runs, "needed", final=True, **keep))
    assert {n: _steps(out, n) for n in "abc"} == {"a": [16], "b": [16], "c": [16]}
    assert total["a"] == {"kept": [16], "deleted": [0, 4, 8, 12]}


def test_dropoffs_retention_keeps_the_checkpoint_before_every_dropoff(tmp_path):
    out = str(tmp_path)
    _fake_finished(out, "a", [0, 4, 8, 12, 16], [(6, 0.5), (14, 0.2), (9, 0.1)])
    pruned = disk.prune(out, [_run("a")], "dropoffs")
    assert _steps(out, "a") == [4, 8, 12, 16] and pruned["a"]["deleted"] == [0]
    assert disk.prune(out, [_run("a")], "all") == {} and _steps(out, "a") == [4, 8, 12, 16]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def branch_study(data_dir, tmp_path_factory):
    """A design of one baseline seed and one remedy branch: the study 'interrupted' after
    its baseline run (that run made by the study's own job command), then resumed."""
    root = tmp_path_factory.mktemp("design")
    cache = jax.config.jax_compilation_cache_dir or str(root / "xla")
    env = {"JAXREPRO_COMPILE_CACHE_DIR": cache, "JAX_PLATFORMS": "cpu"}
    arms = [
        {"name": "base", "vary": "aug", "seeds": "0"},
        {"name": "bb", "branch": "finetune", "overrides": {"finetune.backbone_lr_mult": 0.5}},
    ]
    path = _design_file(root, arms)
    out = str(root / "s")
    config = tiny_digits(data_dir)
    jobs = study.run_study(config, out, design=path, jobs_only=True)
    runs = design_lib.plan_design(config, design_lib.load(path))
    subprocess.run(
        study.job_argv(out, runs[0]), check=True, env=dict(os.environ, **env),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    held = _steps(out, "base_aug0")
    summary = study.run_study(config, out, design=path, env=env, replay=False, diagnose=0)
    return out, summary, jobs, held, path


def test_resumed_design_study_runs_the_branch_from_the_baseline(branch_study, data_dir):
    out, summary, jobs, held, path = branch_study
    assert jobs["runs"] == ["base_aug0", "bb_aug0"]
    session = summary["sessions"][-1]
    assert session["skipped"] == ["base_aug0"] and session["launched"] == ["bb_aug0"]
    assert summary["missing_runs"] == []
    # the baseline run kept its fine-tune start (8) for the branch, beside its last
    assert 8 in held and held[-1] == TINY["pretrain.steps"] + TINY["finetune.steps"]
    branch = jsonio.read_json(os.path.join(out, "runs", "bb_aug0", "config.json"))["replay"]
    assert branch["run"] == os.path.join("..", "base_aug0") and branch["from_step"] == 8
    assert branch["overrides"] == ["finetune.backbone_lr_mult=0.5"]
    arms = {a["name"]: a for a in summary["arm_runs"]}
    assert arms["bb"]["branched_from"]["bb_aug0"] == {
        "run": "base_aug0",
        "from_step": 8,
        "at": "finetune",
    }
    assert {r["run"]: r["point"] for r in summary["runs"]} == {"base_aug0": "base", "bb_aug0": "bb"}
    # the default retention: each run keeps its last checkpoint only, and the summary
    # states the disk use (summary.json "disk")
    assert _steps(out, "base_aug0") == [14] and _steps(out, "bb_aug0") == [14]
    d = summary["disk"]
    assert d["policy"] == "needed" and d["end"]["checkpoints"] == 2
    assert d["line"].startswith("disk: ") and d["peak_bytes"] >= d["end"]["checkpoint_bytes"]
    # the branch's checkpoint is the train state the estimate said (its arrays' bytes)
    c = Checkpoints(os.path.join(out, "runs", "bb_aug0", "checkpoints"), read_only=True)
    arrays = c.arrays(14)
    c.close()
    assert sum(a.nbytes for a in arrays.values()) == d["checkpoint_bytes"]
    # a rerun runs nothing
    again = study.run_study(tiny_digits(data_dir), out, design=path, replay=False, diagnose=0)
    assert again["sessions"][-1]["launched"] == []


def test_a_branch_is_bitwise_the_full_run_with_the_override_in_fine_tuning(
    branch_study, data_dir, tmp_path
):
    """Pretraining is shared bit for bit, and the fresh fine-tune optimizer of the branch's
    own config (a backbone lr multiplier: another optimizer structure) is what a full run
    of that config has there: the same final parameters and fine-tune rows."""
    from jaxrepro.train import loop

    out, *_ = branch_study
    config = tiny_digits(data_dir, finetune__backbone_lr_mult=0.5)
    info = loop.run(config, str(tmp_path / "full"))
    branch = jsonio.read_json(os.path.join(out, "runs", "bb_aug0", "run.json"))
    assert branch["final_param_hash"] == info["final_param_hash"]
    full = [r for r in dropoff.read_metrics(str(tmp_path / "full")) if r["phase"] == "finetune"]
    mine = dropoff.read_metrics(os.path.join(out, "runs", "bb_aug0"))
    assert [r for r in mine if r["phase"] == "finetune"] == full
