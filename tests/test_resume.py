"""Resume: kill -9 at any moment (also inside a save), SIGTERM, corrupt checkpoints."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import TINY_FLAGS, rows_equal, spawn_train, tiny_digits

from jaxrepro.checkpoints import Checkpoints
from jaxrepro.errors import CheckpointError
from jaxrepro.plumbing import jsonio, sigkill
from jaxrepro.train import loop
from jaxrepro.train.setup import RunSetup
from jaxrepro.workdir import Workdir


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("straight")
    info = loop.run(tiny_digits(data_dir), str(path))
    return info, Workdir(str(path)).metrics()


def _train_steps(rows):
    return [r["step"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("stop_after", [3, 8, 11])
def test_interrupted_and_resumed_equals_straight(straight, data_dir, tmp_path, stop_after):
    info, rows = straight
    path = str(tmp_path / "run")
    partial = loop.run(tiny_digits(data_dir), path, stop_after=stop_after)
    assert partial["status"] == "running"
    resumed = loop.run(tiny_digits(data_dir), path)
    assert resumed["status"] == "done"
    assert resumed["final_state_hash"] == info["final_state_hash"]
    assert rows_equal(Workdir(path).metrics(), rows)
    assert resumed["resumes"] and resumed["resumes"][0]["from_step"] <= stop_after


def test_digits_read_by_worker_processes_and_resumed_mid_epoch_equal_straight(
    straight, data_dir, tmp_path
):
    """The splits read lazily, the train batches by one worker process, stopped at step 10
    (fine-tune, mid-epoch) and resumed with none: the rows and state of the in-memory run.
    (Two workers, and a restart of them: tests/test_pipeline.py.)"""
    info, rows = straight
    path = str(tmp_path / "run")
    lazy = {"runtime.max_in_memory_mb": 0}
    first = tiny_digits(data_dir, runtime__data_workers=1, runtime__data_prefetch=1, **lazy)
    partial = loop.run(first, path, stop_after=10)
    assert partial["data_pipeline"]["lazy_train_splits"] == ["pretrain", "finetune"]
    assert partial["data_wait"]["steps"] == 9 and partial["corrupt_records"] == []
    resumed = loop.run(tiny_digits(data_dir, **lazy), path)
    assert resumed["status"] == "done" and resumed["data_pipeline"]["workers"] == 0
    assert resumed["final_state_hash"] == info["final_state_hash"]
    assert rows_equal(Workdir(path).metrics(), rows)


def _spawn(workdir, data_dir, cache_dir):
    return spawn_train(
        TINY_FLAGS, workdir, data_dir, JAXREPRO_COMPILE_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1"
    )


def test_kill_when_kills_or_says_the_process_ended_first(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    proc = subprocess.Popen(sleeper)
    assert sigkill.kill_when(proc, lambda: True) and proc.returncode == -signal.SIGKILL
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert not sigkill.kill_when(proc, lambda: False) and proc.returncode == 0
    proc = subprocess.Popen(sleeper)
    with pytest.raises(TimeoutError, match="did not reach the kill point"):
        sigkill.kill_when(proc, lambda: False, timeout=0.2)
    assert proc.returncode == -signal.SIGKILL  # not left running
    for name in ("4", "12", "8.orbax-checkpoint-tmp-1700000000"):  # a save in flight
        os.makedirs(tmp_path / name)
    assert sigkill.complete_checkpoints(str(tmp_path)) == [4, 12]
    assert sigkill.complete_checkpoints(str(tmp_path / "none")) == []


def _n_train_rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return len(_train_steps(jsonio.read_jsonl(path))) if os.path.exists(path) else 0


def _saving(workdir):
    return bool(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))


def test_sigkill_at_several_points_resumes_bitwise(straight, data_dir, tmp_path):
    info, rows = straight
    workdir = str(tmp_path / "killed")
    cache = str(tmp_path / "xla")
    kill_points = [
        ("after 2 train rows", lambda: _n_train_rows(workdir) >= 2),
        ("inside a save", lambda: _n_train_rows(workdir) >= 4 and _saving(workdir)),
        ("in fine-tuning", lambda: _n_train_rows(workdir) >= 10),
    ]
    killed = []
    for label, predicate in kill_points:
        proc = _spawn(workdir, data_dir, cache)
        if sigkill.kill_when(proc, predicate):
            killed.append(label)
    assert "inside a save" in killed, f"never caught a save in flight (killed: {killed})"
    proc = _spawn(workdir, data_dir, cache)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    done = Workdir(workdir).read_run()
    assert done["status"] == "done"
    assert done["final_state_hash"] == info["final_state_hash"]
    resumed_rows = Workdir(workdir).metrics()
    assert _train_steps(resumed_rows) == list(range(14))  # no duplicate, no missing step
    assert rows_equal(resumed_rows, rows)
    assert len(done["resumes"]) >= len(killed)


def test_sigterm_checkpoints_and_exits_cleanly(straight, data_dir, tmp_path):
    info, _ = straight
    workdir = str(tmp_path / "preempted")
    proc = _spawn(workdir, data_dir, str(tmp_path / "xla"))
    deadline = time.time() + 240
    while _n_train_rows(workdir) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    run = Workdir(workdir).read_run()
    assert run["status"] == "running" and run["step"] < 14
    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpts.latest_step() == run["step"]  # the preemption checkpoint
    ckpts.close()
    done = loop.run(tiny_digits(data_dir), workdir)
    assert done["final_state_hash"] == info["final_state_hash"]


def _largest_data_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "packed", "*.bin"))
    return max(files, key=os.path.getsize)


def test_flipped_byte_is_refused_naming_the_array(data_dir, tmp_path):
    path = str(tmp_path / "run")
    loop.run(tiny_digits(data_dir, **{"finetune.steps": 0, "pretrain.steps": 4}), path)
    ckpt_dir = os.path.join(path, "checkpoints")
    target = _largest_data_file(os.path.join(ckpt_dir, "4"))
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
    runner = RunSetup(tiny_digits(data_dir, **{"finetune.steps": 0, "pretrain.steps": 4}))
    with pytest.raises(CheckpointError, match=r"corrupt: array\(s\) \S+"):
        runner.restore(Checkpoints(ckpt_dir, read_only=True), 4)
    # a truncated file is refused by its size, before any checksum
    with open(target, "r+b") as f:
        f.truncate(len(data) - 4096)
    with pytest.raises(CheckpointError, match=r"float32.bin is corrupt: \d+ bytes, expected"):
        runner.restore(Checkpoints(ckpt_dir, read_only=True), 4)
    assert os.path.getsize(target) == len(data) - 4096  # nothing on disk was touched


def test_checkpoint_of_another_architecture_is_refused(data_dir, tmp_path):
    path = str(tmp_path / "run")
    cfg = tiny_digits(data_dir, **{"finetune.steps": 0, "pretrain.steps": 4})
    loop.run(cfg, path)
    wider = tiny_digits(data_dir, **{"finetune.steps": 0, "pretrain.steps": 4, "model.width": 16})
    runner = RunSetup(wider)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        runner.restore(Checkpoints(os.path.join(path, "checkpoints"), read_only=True), 4)


def test_half_written_save_is_never_restored(data_dir, tmp_path):
    path = str(tmp_path / "run")
    cfg = tiny_digits(data_dir)
    loop.run(cfg, path, stop_after=6)
    ckpt_dir = os.path.join(path, "checkpoints")
    # A save that a kill interrupted: a tmp dir with partial content.
    fake = os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(fake, "state"))
    with open(os.path.join(fake, "state", "junk"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(100))
    ckpts = Checkpoints(ckpt_dir)
    assert 6 not in ckpts.steps() and ckpts.latest_step() == 4
    ckpts.close()
    done = loop.run(cfg, path)
    assert done["status"] == "done" and done["resumes"][0]["from_step"] == 4


def _legacy_save(ckpts: Checkpoints, step: int, tree, manifest: dict) -> None:
    """A checkpoint as written before manifests named their checksum (sha256 digests)."""
    import orbax.checkpoint as ocp

    from jaxrepro import checkpoints as ckpt_lib

    meta = {"step": step, "manifest": manifest, "shapes": ckpt_lib._shapes(tree)}
    ckpts._mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(meta)),
    )
    ckpts.wait()


def test_manifest_checksums_new_and_legacy(tmp_path):
    import jax.numpy as jnp

    from jaxrepro.plumbing import hashing

    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": {"v": jnp.ones(5, jnp.int32)}}
    crc = hashing.leaf_checksums(tree)
    assert set(crc) == {"w", "b/v"} and all(v.startswith("crc32:") for v in crc.values())
    flipped = {"w": tree["w"].at[1, 2].set(-5.0), "b": tree["b"]}
    assert hashing.leaf_checksums(flipped)["w"] != crc["w"]
    assert hashing.leaf_checksums(flipped)["b/v"] == crc["b/v"]
    with pytest.raises(ValueError, match="unknown manifest checksum"):
        hashing.leaf_checksums(tree, "md5")
    # new checkpoints record crc32; legacy ones (sha256, no name) are checked as sha256
    ckpts = Checkpoints(str(tmp_path / "ck"))
    ckpts.save(1, tree, {})
    ckpts.wait()
    assert ckpts.meta(1)["manifest_algo"] == "crc32"
    _legacy_save(ckpts, 2, tree, hashing.leaf_hashes(tree))
    bad = dict(hashing.leaf_hashes(tree), w=hashing.leaf_hashes(flipped)["w"])
    _legacy_save(ckpts, 3, tree, bad)
    for step in (1, 2):
        got, _ = ckpts.restore(step, tree)
        assert np.array_equal(got["w"], tree["w"]) and np.array_equal(got["b"]["v"], tree["b"]["v"])
    with pytest.raises(CheckpointError, match=r"corrupt: array\(s\) w do not match"):
        ckpts.restore(3, tree)
    ckpts.close()


def test_state_is_saved_packed_and_read_back_in_every_layout(tmp_path):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxrepro import checkpoints as ckpt_lib
    from jaxrepro.plumbing import hashing

    tree = {
        "w": jnp.arange(12.0).reshape(3, 4),
        "b": {"v": jnp.ones(5, jnp.int32), "s": jnp.asarray(7, jnp.int32)},
        "z": jnp.zeros((0, 3)),
        "u": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3),
        "e": jnp.zeros((2, 0), jnp.uint8),  # a dtype with nothing to store
    }
    legacy = {k: v for k, v in tree.items() if k not in ("z", "e")}  # orbax: no empty arrays
    ckpts = Checkpoints(str(tmp_path / "ck"))
    ckpts.save(1, tree, {})
    _legacy_save(ckpts, 2, legacy, hashing.leaf_hashes(legacy))
    ckpts.save(4, tree, {}, layout="orbax-packed")
    ckpts.save(5, legacy, {}, layout="leaves")  # orbax: no empty arrays
    ckpts.wait()
    with pytest.raises(ValueError, match="unknown checkpoint layout 'flat'"):
        ckpts.save(6, tree, {}, layout="flat")
    # on disk: one flat array per dtype, in the order the layout lists, as raw files
    meta = ckpts.meta(1)
    assert meta["layout"]["format"] == ckpt_lib.LAYOUT == "packed-raw-v1"
    assert meta["layout"]["order"] == {
        "float32": ["u", "w", "z"],
        "int32": ["b/s", "b/v"],
        "uint8": ["e"],
    }
    f32 = np.concatenate([np.ravel(tree[k]) for k in ("u", "w", "z")])
    item = tmp_path / "ck" / "1" / "packed"
    for dt, want in (("float32", f32), ("int32", [7, 1, 1, 1, 1, 1]), ("uint8", [])):
        data = (item / f"{dt}.bin").read_bytes()
        assert len(data) == -(-np.asarray(want, dt).nbytes // 4096) * 4096  # zero padded
        n = np.asarray(want, dt).nbytes
        np.testing.assert_array_equal(np.frombuffer(data[:n], dt), want)
        assert not any(data[n:])
    assert not os.path.exists(tmp_path / "ck" / "1" / "state")
    # the same packed arrays through orbax (the layout before raw files)
    assert ckpts.meta(4)["layout"]["format"] == ckpt_lib.ORBAX_PACKED
    raw = ocp.PyTreeCheckpointer().restore(str(tmp_path / "ck" / "4" / "state"))
    assert sorted(raw) == ["float32", "int32"]
    np.testing.assert_array_equal(raw["float32"], f32)
    np.testing.assert_array_equal(raw["int32"], [7, 1, 1, 1, 1, 1])
    assert "layout" not in ckpts.meta(5)
    # raw files; one array per leaf (older, sha256); orbax-packed; one array per leaf
    for step, saved in ((1, tree), (2, legacy), (4, tree), (5, legacy)):
        want = {
            hashing.path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]
        }
        arrays = ckpts.arrays(step)
        got, _ = ckpts.restore(step, saved)
        got = {hashing.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
        assert sorted(arrays) == sorted(got) == sorted(want)
        for k, x in want.items():
            for y in (arrays[k], got[k]):
                assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x), k
    assert sorted(ckpts.arrays(1)) == ["b/s", "b/v", "e", "u", "w", "z"]
    # a layout this version does not know is refused by name
    bad = dict(meta, layout={"format": "packed-v9", "order": meta["layout"]["order"]})
    ckpts._mngr.save(9, args=ocp.args.Composite(meta=ocp.args.JsonSave(bad)))
    ckpts.wait()
    with pytest.raises(CheckpointError, match="unknown layout 'packed-v9'"):
        ckpts.restore(9, tree)
    ckpts.close()


def test_packed_saves_reuse_their_buffers_and_keep_each_state(tmp_path):
    """Back-to-back saves share the host buffers yet each checkpoint holds its own state,
    and a save needs nothing of the caller's arrays once it returns (they may be donated)."""
    import jax.numpy as jnp

    ckpts = Checkpoints(str(tmp_path / "ck"))
    states = [
        {"w": jnp.full((64, 1024), float(i)), "n": jnp.asarray(i, jnp.int32)} for i in range(3)
    ]
    want = [{k: np.asarray(v).copy() for k, v in s.items()} for s in states]
    ckpts.save(1, states[0], {})
    buf = ckpts._host["float32"]
    for step, s in ((2, states[1]), (3, states[2])):  # no wait between saves
        ckpts.save(step, s, {})
        for x in s.values():
            x.delete()  # as donation would
    assert ckpts._host["float32"] is buf
    ckpts.wait()
    like = {"w": jnp.zeros((64, 1024)), "n": jnp.asarray(0, jnp.int32)}
    for step, w in zip((1, 2, 3), want, strict=True):
        got, _ = ckpts.restore(step, like)
        for k in w:
            assert np.array_equal(got[k], w[k]), (step, k)
    # a state of another size gets buffers of its size
    ckpts.save(4, {"w": jnp.ones(3), "n": jnp.asarray(5, jnp.int32)}, {})
    ckpts.wait()
    assert ckpts._host["float32"].shape == (3,)
    assert np.array_equal(ckpts.arrays(4)["w"], np.ones(3))
    ckpts.close()
