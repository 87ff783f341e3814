r"""``jaxrepro bench``: the JAX train step against PyTorch, and the costs around it.

    jaxrepro bench step    [size=32,224 batch=32,8 rounds=5 iters=3 settle=1 cores=0 variants=...
                            torch_variants=channels_last,compiled]
    jaxrepro bench startup [config=configs/digits.py init=both runs=2]  (time to first step)
    jaxrepro bench e2e     [config=configs/digits.py steps=80 rounds=5]  (run vs bare step)
    jaxrepro bench checkpoint [config=configs/digits.py rounds=4]  (save/restore, 3 layouts)
    jaxrepro bench memory  [configs=configs/digits.py:smoke,configs/digits.py]
    jaxrepro bench portable [arch=resnet50 size=32 batch=32 rounds=4 iters=8]  (vs native)
    jaxrepro bench diagnose [config=configs/digits.py steps=80 onset=60]  (arm step vs step)
    jaxrepro bench detector [seeds=4 sets=... labels=... record=current|baseline]
                           (the drop-off detector on labelled streams: bench/detector.py)
    jaxrepro bench data    [image_size=224 batch=32 workers=1,2 ...]  (host input pipeline)
    jaxrepro bench all

Options are ``key=value`` words after the sub-command (absl owns ``--flags``); ``--out``
is the output directory (default ``results/bench``). Each sub-command writes one JSON
file there (``step.json``, ``startup.json``, ``e2e.json``, ``checkpoint.json``,
``memory.json``, ``detector.json``, ``data.json``; ``step
cores=1`` writes ``step_cores1.json``). results/bench/NOTES.md reads them.

How ``step`` measures (the machine may be shared, so nothing is timed alone):

* JAX: the project's own jitted ``train_step`` (``make_train_step``: Adam, BatchNorm
  statistics, the non-finite guard and the metrics), on a batch already on the device,
  augmentation off (PyTorch gets a ready float batch too). ``variants=conv/bn[/tail]``
  adds JAX steps timed in the same rounds: another conv/bn impl, the convolution before
  its hand-written backward (``matmul-autodiff``) or before row blocking
  (``matmul-whole``), or step.py without its update-norm
  metric (tail ``cond-no-update-norm``, to measure what that metric costs; tail ``cond``
  is step.py as it is, the name kept for older commands).
* PyTorch: ``jaxrepro.compare.torch_resnet`` (the same architecture), ``torch.optim.Adam``
  with the same hyperparameters, ``torch.set_num_threads(threads)``; XLA's CPU thread
  pool is left as it is (one thread per core), and ``threads`` defaults to the cores.
  ``cores=N`` runs everything in a child pinned to N cores. PyTorch at its best as well
  as in its default form: ``torch`` is eager NCHW, ``torch_variants`` adds
  ``torch[channels_last]`` (NHWC memory format) and ``torch[compiled]`` (``torch.compile``
  of the channels_last model, where inductor finds a C++ compiler; its cold compile,
  minutes on 2 cores, is the variant's ``compile_s``, outside the timed steps; a compile
  that cannot run or fails is recorded as ``skipped`` with the reason). The headline
  ``ratio_jax_over_torch`` is against the fastest of them (``torch_best``); each one's
  own is in ``ratios_by_torch_variant``.
* Load: ``machine.measured_under_load`` is true when the 1-minute load average, at the
  start or the end, was above 0.75 per CPU of the machine (1.5 on 2 CPUs).
* Both in one process, alternated: each round runs ``iters`` JAX steps, then ``iters``
  PyTorch steps, each turn opened by ``settle`` untimed steps (the first step after the
  other framework's turn pays for the memory that framework gave back: up to 2x at
  224x224 with malloc's huge pages, jaxrepro/plumbing/procenv.py). Reported: the median step
  time, its spread, process CPU time per step, and the median over rounds of the
  per-round ratio (rounds see similar load, so the ratio is steadier than either).
* FLOPs per image: 2 x multiply-adds of every convolution and dense layer of the
  forward pass (counted once from the jaxpr of the model with ``lax`` convolutions at
  batch 1; batch-norm, pooling and the optimizer are not counted), and 3x that for a
  training step (forward + the two backward matmuls). The fraction of peak divides
  ``images/s x train FLOPs`` by the machine's fp32 matmul peak as measured here
  (``jaxrepro.bench.model.matmul_peak``).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from jaxrepro import machine
from jaxrepro.bench.common import (
    alternate,
    int_list,
    machine_info,
    round_ratios,
    summarize,
    versions,
)
from jaxrepro.bench.model import TAILS, matmul_peak, model_flops

STEP_DEFAULTS = {
    "arch": "resnet50",
    "size": "32,224",
    "batch": "32,8",
    "rounds": 5,
    "iters": 3,
    "warmup": 1,
    "settle": 1,  # untimed steps at the start of each runner's turn in every round
    "threads": 0,  # 0: one per core (what XLA uses)
    "classes": 10,
    "conv_impl": "auto",
    "bn_impl": "",  # '': the config default
    "variants": "",  # extra JAX variants timed in the same rounds, e.g. lax/flax,matmul/fused
    "torch": 1,
    # PyTorch beside its default (eager, NCHW): 'channels_last' (NHWC memory format) and
    # 'compiled' (torch.compile of the channels_last model; needs a C++ compiler)
    "torch_variants": "channels_last,compiled",
    "peak_n": 2048,
    "cores": 0,  # >0: measure in a child process pinned to this many cores (step_coresN.json)
}


# ----------------------------------------------------------------------------- runners


def jax_step_runner(
    arch,
    image_size,
    batch,
    num_classes,
    conv_impl="auto",
    bn_impl="",
    tail="project",
    contract_chunk=0,
):
    """The project's jitted train step on a device-resident batch.

    Returns ``(run, info)``: ``run()`` does one step and blocks until it is done;
    ``info`` has the resolved impls and the compile time.
    """
    import jax
    import jax.numpy as jnp

    from jaxrepro import config as config_lib
    from jaxrepro import models, rng
    from jaxrepro.bench.model import conv_impl_override, make_train_step_for, synthetic_variables
    from jaxrepro.train import optimizer as optimizer_lib
    from jaxrepro.train.step import TrainState, step_controls

    config = config_lib.base()
    config.model.name = arch
    if bn_impl:
        config.model.bn_impl = bn_impl
    for op in ("crop", "flip", "brightness", "contrast"):
        config.data.augment[op].enabled = False
    if conv_impl == "auto":
        conv_impl = "matmul" if jax.default_backend() == "cpu" else "lax"
    m = config.model
    with conv_impl_override(conv_impl) as build_impl:
        module = models.build(arch, num_classes, stem=m.stem, conv_impl=build_impl,
                              maxpool_impl=m.maxpool_impl, bn_impl=m.bn_impl,
                              contract_chunk=contract_chunk)  # fmt: skip
    variables = synthetic_variables(module, image_size)
    tx = optimizer_lib.build(config, "pretrain", 1000)
    state = TrainState(
        step=jnp.asarray(0, jnp.int32), params=variables["params"],
        batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
        nonfinite=jnp.asarray(0, jnp.int32),
    )  # fmt: skip
    step = make_train_step_for(
        tail,
        module=module, tx=tx, lr_fn=optimizer_lib.schedule(config, "pretrain", 1000),
        phase_start=0, augment_cfg=config.data.augment, mean=(0.5,) * 3, std=(0.25,) * 3,
        policy=config.train.nonfinite_policy,
    )  # fmt: skip
    r = np.random.default_rng(0)
    batch = jax.device_put({
        "image": r.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
        "label": r.integers(0, num_classes, batch).astype(np.int32),
        "id": np.arange(batch, dtype=np.int32),
        "epoch": np.zeros(batch, np.int32),
    })  # fmt: skip
    keys = (rng.factor_root("aug", 0), rng.factor_root("dropout", 0), step_controls())
    start = time.perf_counter()
    with conv_impl_override(conv_impl):  # the trace happens in lower()
        lowered = step.lower(state, batch, *keys)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run():
        new_state, metrics = compiled(holder[0], batch, *keys)
        jax.block_until_ready(metrics["loss"])
        holder[0] = new_state

    info = {"conv_impl": conv_impl, "bn_impl": m.bn_impl, "maxpool_impl": m.maxpool_impl,
            "tail": tail, "compile_s": compile_s, "contract_chunk": contract_chunk}  # fmt: skip
    return run, info


TORCH_VARIANTS = ("channels_last", "compiled")  # beside the default: eager NCHW ('torch')


class TorchCompileUnavailable(RuntimeError):
    """torch.compile cannot run here (no C++ compiler for its CPU kernels)."""


def torch_step_runner(arch, image_size, batch, num_classes, threads, variant: str = ""):
    """A PyTorch Adam step of the same architecture; ``run()`` does one step.

    ``variant``: '' (eager, NCHW: PyTorch's default), 'channels_last' (the model and the
    batch in NHWC memory format) or 'compiled' (``torch.compile`` of the channels_last
    model; the optimizer step stays eager). A compiled runner has done its first step, which
    traces and compiles the forward and backward passes: ``info['compile_s']``, timed apart,
    with inductor's cache in a fresh directory (a cold compile).

    Raises:
      TorchCompileUnavailable: 'compiled' where inductor finds no C++ compiler.
    """
    import torch

    from jaxrepro import config as config_lib
    from jaxrepro.compare import torch_resnet

    if variant not in ("", *TORCH_VARIANTS):
        raise ValueError(f"unknown PyTorch variant {variant!r}; known: {TORCH_VARIANTS}")
    info = {"variant": variant or "eager", "layout": "NCHW (contiguous)"}
    if variant == "compiled":
        info["compiler"] = _cxx_compiler()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    opt_cfg = config_lib.base().optimizer
    model = torch_resnet.build(arch, num_classes)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    if variant in TORCH_VARIANTS:  # both: channels_last
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        info["layout"] = "NHWC (channels_last)"
    opt = torch.optim.Adam(model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2),
                           eps=opt_cfg.eps)  # fmt: skip
    forward = model
    if variant == "compiled":
        info["compile_cache"] = _fresh_inductor_cache()
        forward = torch.compile(model)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    if variant == "compiled":
        start = time.perf_counter()
        run()
        info["compile_s"] = time.perf_counter() - start
    info["threads"] = torch.get_num_threads()
    return run, info


def _cxx_compiler() -> str:
    """The C++ compiler inductor would use for CPU kernels (``CXX`` or its search list)."""
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception as e:  # inductor raises its own InvalidCxxCompiler, or an ImportError
        raise TorchCompileUnavailable(f"no C++ compiler for torch.compile: {e}") from e


def _fresh_inductor_cache() -> str:
    """Points inductor's cache at a new directory (removed at exit): a cold compile."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="jaxrepro-inductor-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return "fresh (a cold compile)"


# ----------------------------------------------------------------------------- step


def _variants(opts) -> list[tuple[str, str, str]]:
    """(conv_impl, bn_impl, tail) of the main JAX step, then of each extra variant."""
    out = [(opts["conv_impl"], opts["bn_impl"], "project")]
    for word in filter(None, opts["variants"].split(",")):
        parts = word.split("/")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in TAILS):
            raise ValueError(
                f"bench variant {word!r} must be conv_impl/bn_impl[/tail], e.g. lax/flax or "
                f"matmul/flax/cond (tails: {', '.join(TAILS)})"
            )
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "project"))
    return out


def bench_shape(opts, image_size, batch, peak_gflops) -> dict:
    """One (image size, batch) row of step.json."""
    flops = model_flops(opts["arch"], image_size, opts["classes"])
    runners, infos = {}, {}
    for i, (conv_impl, bn_impl, tail) in enumerate(_variants(opts)):
        name = "jax"
        if i:
            name = f"jax[{conv_impl}/{bn_impl}" + ("]" if tail == "project" else f"/{tail}]")
        runners[name], infos[name] = jax_step_runner(
            opts["arch"], image_size, batch, opts["classes"], conv_impl, bn_impl, tail
        )
    skipped = {}
    if opts["torch"]:
        threads = opts["threads"] or machine.cpu_threads()
        for variant in ("", *torch_variants(opts)):
            name = f"torch[{variant}]" if variant else "torch"
            try:
                runners[name], infos[name] = torch_step_runner(
                    opts["arch"], image_size, batch, opts["classes"], threads, variant
                )
            except Exception as e:  # torch.compile: no compiler, or its own error
                if variant != "compiled":
                    raise
                skipped[name] = f"{type(e).__name__}: {str(e)[:1000]}"
    alternate(runners, 1, opts["warmup"])  # first steps: allocation, caches, oneDNN plans
    cpu = {}
    times = alternate(runners, opts["rounds"], opts["iters"], cpu, opts["settle"])
    row = {"image_size": image_size, "batch": batch, "flops_per_image": flops}
    for name, per_round in times.items():
        flat = [t for r in per_round for t in r]
        s = summarize(flat, batch)
        s["fraction_of_peak"] = s["images_per_s"] * flops["train"] / (peak_gflops * 1e9)
        s["rounds_s"] = per_round
        s["cpu_s_median"] = statistics.median(t for r in cpu[name] for t in r)
        s["images_per_cpu_s"] = batch / s["cpu_s_median"]
        row[name] = {**infos[name], **s}
    for name, why in skipped.items():
        row[name] = {"skipped": why}
    if "torch" in times:
        row.update(headline(row, times))
    return row


def headline(row: dict, times: dict) -> dict:
    """JAX against the fastest PyTorch variant (by median step time), the others beside it.

    ``ratio_jax_over_torch``: the median over rounds of the per-round ratio (PyTorch's
    median step time over JAX's) against that variant, ``torch_best``; every timed
    variant's own is in ``ratios_by_torch_variant``.
    """
    torches = [n for n in times if n == "torch" or n.startswith("torch[")]
    best = min(torches, key=lambda n: row[n]["step_s_median"])
    by_variant = {n: statistics.median(round_ratios(times["jax"], times[n])) for n in torches}
    ratios = round_ratios(times["jax"], times[best])  # torch time / jax time
    return {
        "torch_best": best,
        "ratio_jax_over_torch": statistics.median(ratios),
        "ratio_per_round": ratios,
        "ratio_of_medians": row["jax"]["images_per_s"] / row[best]["images_per_s"],
        "ratios_by_torch_variant": by_variant,
    }


def torch_variants(opts) -> list[str]:
    """The PyTorch variants timed beside the default (eager NCHW), checked."""
    out = [v for v in opts["torch_variants"].split(",") if v]
    unknown = [v for v in out if v not in TORCH_VARIANTS]
    if unknown:
        raise ValueError(
            f"bench option torch_variants={opts['torch_variants']!r}: unknown {unknown}; "
            f"known: {', '.join(TORCH_VARIANTS)} (the eager NCHW default is always timed)"
        )
    return out


def bench_step(opts: dict) -> dict:
    """The whole step.json: machine, peak, and one row per (image size, batch)."""
    if opts["cores"] > 0:
        return _pinned_child(opts)
    sizes, batches = int_list(opts["size"], "size"), int_list(opts["batch"], "batch")
    if len(sizes) != len(batches):
        raise ValueError(f"size and batch need the same length, got {sizes} and {batches}")
    machine = machine_info()
    peak = matmul_peak(opts["peak_n"])
    rows = [
        bench_shape(opts, s, b, peak["peak_gflops"]) for s, b in zip(sizes, batches, strict=True)
    ]
    machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    machine.update(load_verdict(machine))
    return {
        "kind": "step", "options": opts, "machine": machine, "versions": versions(),
        "matmul_peak": peak, "shapes": rows, "flops_definition": FLOPS_DEFINITION,
    }  # fmt: skip


def load_verdict(info: dict, cpus: int | None = None) -> dict:
    """Whether the machine was busy: a 1-minute load average, at the start or the end,
    above 0.75 per CPU of the machine (``cpus``: os.cpu_count(); 1.5 on 2 CPUs; the load
    is the whole machine's, also where the bench is pinned to fewer cores). Then the
    absolute numbers are low and only the alternated, per-round ratios are comparable."""
    cpus = cpus or os.cpu_count() or 1
    threshold = 0.75 * cpus
    load = max(info["loadavg"][0], info["loadavg_after"][0])
    out = {"measured_under_load": load > threshold, "load_threshold": threshold}
    if out["measured_under_load"]:
        out["load_note"] = (
            f"measured under load: 1-minute load average up to {load:.2f} on a "
            f"{cpus}-CPU machine (threshold {threshold:.2f}); images/s are low, the "
            "per-round ratios are what compares"
        )
    return out


def _pinned_child(opts: dict) -> dict:
    """Runs ``bench_step`` in a fresh process pinned to the first ``cores`` cores.

    XLA sizes its thread pool by the cores a process may use, and ``threads`` follows
    them, so both frameworks get the same cores. On a shared machine this also keeps
    PyTorch's OpenMP barriers from spinning against other processes' threads.
    """
    import json
    import subprocess
    import sys

    available = sorted(os.sched_getaffinity(0))
    if opts["cores"] > len(available):
        raise ValueError(f"bench option cores={opts['cores']}: only {len(available)} available")
    cores = available[: opts["cores"]]
    child_opts = dict(opts, cores=0, threads=opts["threads"] or len(cores))
    code = (
        f"import os; os.sched_setaffinity(0, {set(cores)!r}); import json; "
        f"from jaxrepro.bench import step as bench; "
        f"print(json.dumps(bench.bench_step({child_opts!r})))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cores)),
               OPENBLAS_NUM_THREADS=str(len(cores)))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"pinned bench child failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["options"] = opts
    result["pinned_cores"] = cores
    return result


# ----------------------------------------------------------------------------- portable mode

PORTABLE_DEFAULTS = {"arch": "resnet50", "size": 32, "batch": 32, "rounds": 4, "iters": 8}


def portable_step_times(opts: dict, portable: bool) -> dict:
    """In a child: ``iters`` timed train steps, native or in portable mode (machine.py)."""
    from jaxrepro import machine

    flags = os.environ.get("XLA_FLAGS", "")
    if machine.portable_flags_in_force(flags) != portable:
        raise RuntimeError(f"portable={portable} child started with XLA_FLAGS={flags!r}")
    chunk = machine.PORTABLE_CHUNK if portable else 0
    run, info = jax_step_runner(opts["arch"], opts["size"], opts["batch"], 10, contract_chunk=chunk)
    run()  # the first step after compiling touches fresh memory
    times = []
    for _ in range(opts["iters"]):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"times": times, "compile_s": info["compile_s"], "xla_flags": flags}


def _portable_child(opts: dict, portable: bool) -> dict:
    import json
    import subprocess
    import sys

    from jaxrepro import machine

    names = {p.partition("=")[0] for p in machine.PORTABLE_FLAGS}
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.partition("=")[0] not in names]
    env = dict(
        os.environ, XLA_FLAGS=" ".join(kept + (list(machine.PORTABLE_FLAGS) if portable else []))
    )
    code = (
        "import json; from jaxrepro.bench import step as bench; "
        f"print(json.dumps(bench.portable_step_times({opts!r}, {portable!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"portable bench child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_portable(opts: dict) -> dict:
    """Portable CPU mode against native: the same train step in alternating child processes.

    Each round starts one native and one portable child (the order alternates between
    rounds), each times ``iters`` steps; the per-round ratio is the portable median step
    time over the native one (> 1: portable is slower).
    """
    from jaxrepro import machine as machine_lib

    rounds = []
    for r in range(opts["rounds"]):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {p: _portable_child(opts, p) for p in order}
        rounds.append({"native": got[False], "portable": got[True]})
    native = [x for rd in rounds for x in rd["native"]["times"]]
    portable = [x for rd in rounds for x in rd["portable"]["times"]]
    ratios = [statistics.median(rd["portable"]["times"]) / statistics.median(rd["native"]["times"])
              for rd in rounds]  # fmt: skip
    return {
        "kind": "portable", "options": opts, "machine": machine_info(), "versions": versions(),
        "cpu": machine_lib.cpu_info(), "portable_flags": list(machine_lib.PORTABLE_FLAGS),
        "contract_chunk": machine_lib.PORTABLE_CHUNK,
        "native": summarize(native, opts["batch"]), "portable": summarize(portable, opts["batch"]),
        "slowdown_per_round": [round(x, 3) for x in ratios],
        "slowdown_median": round(statistics.median(ratios), 3),
        "compile_s": {"native": [rd["native"]["compile_s"] for rd in rounds],
                      "portable": [rd["portable"]["compile_s"] for rd in rounds]},
    }  # fmt: skip


FLOPS_DEFINITION = (
    "2 x multiply-adds of every convolution and dense layer in the forward pass, counted "
    "from the jaxpr of the model with lax convolutions at batch 1 (batch-norm, pooling, "
    "loss and optimizer not counted); a training step counts 3x the forward."
)


def _print_step(result: dict) -> None:
    for row in result["shapes"]:
        line = f"{row['image_size']}x{row['image_size']} batch {row['batch']}:"
        for name in (k for k in row if k.startswith(("torch", "jax"))):
            if isinstance(row[name], dict) and "images_per_s" in row[name]:
                line += f"  {name} {row[name]['images_per_s']:.2f} img/s"
                if "compile_s" in row[name] and name.startswith("torch"):
                    line += f" (compile {row[name]['compile_s']:.0f} s)"
            elif isinstance(row[name], dict) and "skipped" in row[name]:
                line += f"  {name} skipped ({row[name]['skipped'][:80]})"
        if "ratio_jax_over_torch" in row:
            line += f"  ratio {row['ratio_jax_over_torch']:.2f} against {row['torch_best']}"
        print(line)
    if result["machine"].get("measured_under_load"):
        print(result["machine"]["load_note"])
