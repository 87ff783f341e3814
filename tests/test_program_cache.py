"""The program cache (jaxrepro/plumbing/program_cache.py): what its key leaves out does not
change a program; a stored program is loaded without a trace and trains the same bits,
whether it was compiled fresh or handed out by JAX's persistent cache; a bad entry is a
miss."""

from __future__ import annotations

import copy
import os

import jax
from helpers import TINY_FLAGS, rows_equal, set_dotted, spawn_train, tiny_digits

from jaxrepro.plumbing import program_cache
from jaxrepro.train import loop
from jaxrepro.train.programs import PROGRAM_FREE_FIELDS, Programs
from jaxrepro.train.setup import RunSetup
from jaxrepro.workdir import Workdir

# A value for each program-free field that differs from the tiny config's.
CHANGED = {
    "seed": 7,
    "seeds": {"init": 3, "aug": 4, "data": 5, "dropout": 6, "head": 8},
    "init_from": None,  # set below to a path: the pretrained weights are inputs, not code
    "checkpoint": {"every": 2, "keep_last": 1},
    "runtime": {"progress": "off", "max_in_memory_mb": 0, "heartbeat_every_s": 3.0},
    "dropoff": {"loss": {"spike_ratio": 3.0}, "accuracy": {"min_drop": 0.2}},
    "diagnose": {"after": 9, "window": 2},
    "data.data_dir": "/somewhere/else",
}


def _lowered_text(config, phase_index=0):
    setup = RunSetup(config)
    phase = setup.phases[phase_index]
    programs = Programs(setup)
    state = setup.abstract_init_state()
    batch, _ = setup.device_batch(phase, phase.start)
    args = (setup.par.replicate(state), batch, *setup.step_inputs(phase))
    return programs._lower_train(phase, args).as_text(), programs.describe(phase, "train")


def _apply(config, dotted, value):
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    set_dotted(config, f"{dotted}.{k}.{k2}", v2)
            else:
                set_dotted(config, f"{dotted}.{k}", v)
    else:
        set_dotted(config, dotted, value)


def test_program_free_fields_leave_the_lowered_program_unchanged(data_dir, monkeypatch):
    base = tiny_digits(data_dir)
    want, want_desc = _lowered_text(base)
    assert set(CHANGED) == set(PROGRAM_FREE_FIELDS)
    for dotted in PROGRAM_FREE_FIELDS:
        config = copy.deepcopy(base)
        with config.unlocked():
            if dotted == "init_from":
                # weights read from a run: shapes only matter to the trace
                monkeypatch.setattr("jaxrepro.train.state.load_pretrained", lambda c, p, b: (p, b))
                config.init_from = "/a/pretrained/run"
            else:
                _apply(config, dotted, CHANGED[dotted])
        text, desc = _lowered_text(config)
        assert desc == want_desc, dotted  # the key leaves it out ...
        assert text == want, dotted  # ... and rightly: the program is the same
        monkeypatch.undo()
    # The check can fail: a field that enters the program changes both.
    config = copy.deepcopy(base)
    config.optimizer.lr = base.optimizer.lr * 2
    text, desc = _lowered_text(config)
    assert text != want and desc != want_desc


def test_the_key_follows_the_source_the_flags_and_the_arguments(data_dir, monkeypatch):
    setup = RunSetup(tiny_digits(data_dir))
    phase = setup.phases[0]
    desc = Programs(setup).describe(phase, "train")
    args = (setup.par.replicate(setup.abstract_init_state()),)
    k = program_cache.key(desc, args)
    assert program_cache.key(desc, args) == k
    monkeypatch.setattr(program_cache, "_source_digest", lambda: "edited")
    assert program_cache.key(desc, args) != k
    monkeypatch.undo()
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2")
    assert program_cache.key(desc, args) != k
    monkeypatch.undo()
    wider = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2, *x.shape), x.dtype), args)
    assert program_cache.key(desc, wider) != k
    assert program_cache.key({**desc, "program": "eval"}, args) != k


def test_the_cache_is_off_with_the_compile_cache_or_by_its_own_switch(monkeypatch):
    monkeypatch.setenv("JAXREPRO_PROGRAM_CACHE", "0")
    assert program_cache.directory() is None and not program_cache.stored("0" * 64)
    monkeypatch.setenv("JAXREPRO_PROGRAM_CACHE", "1")
    assert program_cache.directory() == jax.config.jax_compilation_cache_dir + "-programs"
    cache = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert program_cache.directory() is None  # JAXREPRO_COMPILE_CACHE=0 leaves it unset
    finally:
        jax.config.update("jax_compilation_cache_dir", cache)


def _train(tmp, name, data_dir, cache):
    path = str(tmp / name)
    flags = [*TINY_FLAGS, "--config.finetune.steps=0"]  # one program: the pretrain step
    proc = spawn_train(
        flags, path, data_dir, JAXREPRO_COMPILE_CACHE_DIR=cache, JAXREPRO_PROGRAM_CACHE="1"
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    ws = Workdir(path)
    return ws.read_run()["programs"], ws.metrics()


def test_a_stored_program_is_loaded_and_trains_the_same_bits(tmp_path, data_dir):
    """Fresh compile -> stored; loaded; a JAX cache hit -> stored with the cache's bytes (an
    executable loaded from there cannot be serialized again); loaded. Same rows each time."""
    cache = str(tmp_path / "xla")  # empty: the first run compiles for real
    programs_dir = cache + "-programs"
    how, rows = _train(tmp_path, "fresh", data_dir, cache)
    assert how == {"train_pretrain": "compiled"} and len(os.listdir(programs_dir)) == 1
    how, again = _train(tmp_path, "loaded", data_dir, cache)
    assert how == {"train_pretrain": "loaded"} and rows_equal(again, rows)
    for name in os.listdir(programs_dir):
        os.unlink(os.path.join(programs_dir, name))
    how, hit = _train(tmp_path, "jax_hit", data_dir, cache)  # JAX's cache has both
    assert how == {"train_pretrain": "compiled"} and rows_equal(hit, rows)
    how, again = _train(tmp_path, "loaded_from_hit", data_dir, cache)
    assert how == {"train_pretrain": "loaded"} and rows_equal(again, rows)


def test_an_unreadable_or_mismatched_entry_is_a_miss(tmp_path, data_dir, monkeypatch, caplog):
    monkeypatch.setattr(program_cache, "directory", lambda: str(tmp_path / "programs"))
    config = tiny_digits(data_dir, finetune__steps=0)
    info = loop.run(config, str(tmp_path / "a"))
    assert info["programs"] == {"train_pretrain": "compiled"}
    (name,) = os.listdir(tmp_path / "programs")
    rows = Workdir(str(tmp_path / "a")).metrics()
    lowered = []
    real = Programs._lower_train
    monkeypatch.setattr(
        Programs, "_lower_train", lambda self, *a: (lowered.append(1), real(self, *a))[1]
    )
    info = loop.run(config, str(tmp_path / "b"))
    assert info["programs"] == {"train_pretrain": "loaded"} and not lowered  # no trace
    assert rows_equal(Workdir(str(tmp_path / "b")).metrics(), rows)
    with open(tmp_path / "programs" / name, "wb") as f:
        f.write(b"not a program")
    info = loop.run(config, str(tmp_path / "c"))
    assert info["programs"] == {"train_pretrain": "compiled"} and lowered
    assert "unreadable" in caplog.text
    assert rows_equal(Workdir(str(tmp_path / "c")).metrics(), rows)
    # An entry made for other arguments (a key collision, or a bug in the key) is refused.
    monkeypatch.setattr(
        program_cache, "key", lambda d, a: name.removesuffix(".program")
    )  # every program now has the train step's key
    bigger = config.pretrain.batch_size + 4
    other = tiny_digits(data_dir, finetune__steps=0, pretrain__batch_size=bigger)
    info = loop.run(other, str(tmp_path / "d"))
    assert info["programs"] == {"train_pretrain": "compiled"}
    assert "made for other arguments" in caplog.text


def test_a_reloaded_executable_is_stored_only_with_the_bytes_it_was_loaded_from(
    tmp_path, data_dir, monkeypatch
):
    """A hit whose bytes were not seen (or two hits, or bytes without a hit) is not stored:
    serializing a reloaded executable again gives a program that fails when run."""
    monkeypatch.setattr(program_cache, "directory", lambda: str(tmp_path / "programs"))
    setup = RunSetup(tiny_digits(data_dir, finetune__steps=0))
    phase = setup.phases[0]
    programs = Programs(setup)
    state = setup.par.replicate(setup.abstract_init_state())
    batch, _ = setup.device_batch(phase, 0)
    compiled = programs.train_job(phase, state, batch)()  # a fresh compile or a hit: stored
    assert len(os.listdir(tmp_path / "programs")) == 1
    desc = programs.describe(phase, "train")
    for hits, raw, stored in ((0, [], True), (1, [b"x"], True), (1, [], False),
                              (2, [b"x", b"y"], False), (0, [b"x"], False)):  # fmt: skip
        fake = program_cache.Capture()
        fake.hits, fake.raw = hits, raw
        assert fake.stored_bytes()[0] is stored
        if not stored:
            assert not program_cache.save("k", compiled, desc, fake)
            assert not os.path.exists(tmp_path / "programs" / "k.program")
