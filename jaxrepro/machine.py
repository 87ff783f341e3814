"""What the bits depend on about the machine, and the portable CPU mode.

XLA:CPU's results depend on more than its flags (docs/determinism.md):

* **Runtime-dispatched kernels.** XLA 0.10 hands reductions (the gradient norms, the
  BatchNorm sums) to YNNPACK fusions, which pick their kernels from the CPU's features
  when they run. ``--xla_cpu_max_isa`` bounds only the code XLA generates itself, so an
  AVX-512 and an AVX2 machine sum in another order even with ``--xla_cpu_max_isa=AVX2``:
  the first gradient norm of the smoke config differs in its last bits.
* **Cache-sized blocking.** Matmuls run through Eigen, which cuts the contraction into
  blocks of ``kc`` terms sized from the L1 data cache (320 terms with 48 KiB, 288 with
  32 KiB) and adds the blocks' partial sums: another L1 size, another summation order.
* **Code generation.** Without FMA (``--xla_cpu_max_isa=AVX`` or older) even the
  initial parameters change.

So the fingerprint that bitwise equality is conditional on holds the CPU's vendor,
family and model (which fix its caches) and its instruction-set features, besides the
thread count, the XLA flags and the device layout.

**Portable mode** (``determinism.portable``) removes the first two dependencies on
x86-64 CPUs with AVX2 and FMA: XLA's code generation is capped at AVX2, YNNPACK fusions
are turned off (XLA emits those reductions itself), and every matmul of the model is cut
into contractions of at most ``PORTABLE_CHUNK`` terms, each below any L1-sized Eigen
block, whose partial results are added in a fixed order. Its fingerprint then names the
instruction-set level instead of the CPU model.
"""

from __future__ import annotations

import os
import platform as _platform

from jaxrepro.errors import ConfigError, JaxreproError

# /proc/cpuinfo flags that change what XLA:CPU or its kernel libraries run.
ISA_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip

# Portable mode: what the CPU must have, the XLA flags it sets, the contraction chunk.
PORTABLE_ISA = ("avx2", "fma")
PORTABLE_FLAGS = ("--xla_cpu_max_isa=AVX2", "--xla_cpu_experimental_ynn_fusion_type=")
# Eigen's smallest block on a CPU with a 32 KiB L1d is 288 terms (48 KiB: 320); 256 is
# below both and a multiple of its 8-term peeling.
PORTABLE_CHUNK = 256
PORTABLE_LEVEL = "x86-64 AVX2+FMA"


class PlatformMismatch(JaxreproError):
    """The recorded run's platform differs from this one in what the bits depend on."""


# ----------------------------------------------------------------------------- the CPU


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def _cache_sizes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """L1d, L2, L3 sizes in KiB (Linux sysfs), as far as the kernel reports them."""
    out = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        name = f"L{level}d" if kind == "Data" else f"L{level}"
        if size.endswith("K"):
            out[name] = int(size[:-1])
        elif size.endswith("M"):
            out[name] = int(size[:-1]) * 1024
    return out


def cpu_info(cpuinfo_text: str | None = None) -> dict:
    """The CPU as far as the bits are concerned: vendor, family/model, ISA, caches."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    fields = _cpuinfo_fields(cpuinfo_text)
    flags = set(fields.get("flags", "").split())
    return {
        "arch": _platform.machine(),
        "vendor": fields.get("vendor_id"),
        "model_name": fields.get("model name") or _platform.processor() or None,
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "isa": [f for f in ISA_FEATURES if f in flags],
        "caches_kib": _cache_sizes() if cpuinfo_text else {},
    }


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def portable_capable(cpu: dict) -> bool:
    return cpu.get("arch") in ("x86_64", "AMD64") and all(f in cpu["isa"] for f in PORTABLE_ISA)


# ----------------------------------------------------------------------------- flags


def flag_value(xla_flags: str, name: str) -> str | None:
    """The value of ``--name`` in an XLA_FLAGS string (the last one wins), or None."""
    value = None
    for f in xla_flags.split():
        key, _, v = f.partition("=")
        if key == name:
            value = v
    return value


def effective_max_isa(xla_flags: str) -> str:
    """``--xla_cpu_max_isa`` as XLA sees it: the flag's value, or the CPU's own."""
    return flag_value(xla_flags, "--xla_cpu_max_isa") or "native"


def portable_flags_in_force(xla_flags: str) -> bool:
    return all(
        flag_value(xla_flags, f.partition("=")[0]) == f.partition("=")[2] for f in PORTABLE_FLAGS
    )


def apply_portable(portable: bool, env: dict | None = None) -> list[str]:
    """Adds portable mode's XLA flags to ``XLA_FLAGS`` before the CPU backend starts.

    Returns the flags added. A process whose backend already started without them cannot
    run in portable mode: that is an error, never a silent native run.
    """
    if not portable:
        return []
    env = os.environ if env is None else env
    current = env.get("XLA_FLAGS", "")
    if portable_flags_in_force(current):
        return []
    from jax._src import xla_bridge  # no public way to ask whether a backend has started

    if env is os.environ and xla_bridge.backends_are_initialized():
        raise ConfigError(
            "determinism.portable needs XLA_FLAGS to hold "
            f"{' '.join(PORTABLE_FLAGS)!r} before JAX starts its backend, and this process "
            "started it without them: run through the jaxrepro CLI (it sets them) or set "
            "XLA_FLAGS first"
        )
    env["XLA_FLAGS"] = " ".join([current, *PORTABLE_FLAGS]).strip()
    return list(PORTABLE_FLAGS)


def check_portable(portable: bool, backend: str, cpu: dict, xla_flags: str) -> None:
    """Refuses portable mode where it cannot hold (not a CPU with AVX2+FMA, flags missing)."""
    if not portable or backend != "cpu":
        return
    if not portable_capable(cpu):
        raise ConfigError(
            f"determinism.portable needs an x86-64 CPU with {'+'.join(PORTABLE_ISA)}; this "
            f"one ({cpu.get('arch')}, {cpu.get('model_name')}) has {cpu.get('isa')}"
        )
    if not portable_flags_in_force(xla_flags):
        raise ConfigError(
            f"determinism.portable: XLA_FLAGS={xla_flags!r} lacks {' '.join(PORTABLE_FLAGS)!r}"
        )


# ----------------------------------------------------------------------------- fingerprints

_SETUP_KEYS = ("backend", "device_kind", "device_count", "process_count", "cpu_threads")


def fingerprint(info: dict) -> dict:
    """The part of run.json's ``platform`` that bitwise equality is conditional on.

    ``info`` is ``runinfo.platform_info()``'s record. On CPU it names the CPU (vendor,
    family, model, instruction-set features), or in portable mode only the level that
    mode needs.
    """
    fp = {k: info.get(k) for k in _SETUP_KEYS}
    fp["xla_flags"] = " ".join(sorted((info.get("xla_flags") or "").split()))
    fp["jaxlib"] = info.get("jaxlib")
    if info.get("backend") == "cpu":
        cpu = info.get("cpu") or {}
        if info.get("portable"):
            fp["cpu"] = {"portable": PORTABLE_LEVEL, "arch": cpu.get("arch")}
        else:
            fp["cpu"] = {k: cpu.get(k) for k in ("arch", "vendor", "family", "model", "isa")}
    return fp


def fingerprint_id(fp: dict) -> str:
    """A short stable name for a fingerprint (pinned-hash tables, reports)."""
    import hashlib
    import json

    text = json.dumps(fp, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def differences(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints; [] when bits can match."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}.{sub}: recorded {a.get(sub)!r}, here {b.get(sub)!r}")
        else:
            out.append(f"{key}: recorded {a!r}, here {b!r}")
    return out


def compare_platforms(recorded_info: dict, current_info: dict, *, force: bool, what: str) -> dict:
    """Checks before any work that ``what`` can be bitwise; refuses unless ``force``.

    Returns the record to keep: whether bitwise equality can be expected, the
    differences that rule it out, and whether the user forced the work on.
    """
    if not recorded_info:
        diffs = ["the run recorded no platform"]
    else:
        diffs = differences(fingerprint(recorded_info), fingerprint(current_info))
    if diffs and not force:
        raise PlatformMismatch(
            f"{what}: the run was recorded on another platform, so bitwise equality cannot "
            "be expected (" + "; ".join(diffs) + "); pass --force to go on anyway"
        )
    return {"bitwise_expected": not diffs, "differences": diffs, "forced": bool(diffs and force)}
