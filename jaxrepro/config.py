"""Config loading, validation and comparison.

Configs are ``ml_collections.ConfigDict`` objects made by ``configs/<exp>.py:get_config``.
Locking (``lock_config=True`` in the flag, ``config.lock()`` here) turns a typo in an
override into an error; ``validate`` then checks values before any work is done, naming
the field at fault.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterable

import ml_collections
from ml_collections import config_dict

from jaxrepro import rng
from jaxrepro.errors import ConfigError

CONV_IMPLS = ("auto", "lax", "matmul")
MAXPOOL_IMPLS = ("lax", "deterministic")
STEMS = ("imagenet", "cifar")
SCHEDULES = ("constant", "cosine")
REMAINDERS = ("drop", "stream")
NONFINITE_POLICIES = ("stop", "skip")
CORRUPT_POLICIES = ("error", "skip")  # jaxrepro.data.sources.CORRUPT_POLICIES
DTYPES = ("float32", "bfloat16")
PROGRESS_MODES = ("auto", "bar", "lines", "off")  # jaxrepro.train.progress
# Fields that may differ between a workdir's stored config and a resuming one, because
# they do not change the trajectory (where data is cached, how often we print).
NON_SEMANTIC_FIELDS = ("data.data_dir", "runtime", "checkpoint", "dropoff", "diagnose")
# Fields added after configs were first stored, with the value that gives the earlier
# behaviour: a stored config.json / study.json without one means that value, so an
# earlier run still resumes, replays and compares as the same config.
ADDED_FIELDS = {
    "model.dropout_rate": 0.0,
    "determinism.portable": False,
    "data.on_corrupt": "error",
    "data.jpeg_draft": False,
    "finetune.schedule": None,
    "finetune.warmup_steps": None,
    "checkpoint.keep_phase_starts": False,
}


def load_python_file(path: str, kind: str, function: str):
    """Executes the Python file ``path`` (a ``kind`` file: config, design) as a module that
    must define ``function``; ConfigError naming the file when it fails to load or lacks it."""
    spec = importlib.util.spec_from_file_location(f"_jaxrepro_{kind}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a malformed file: report it, with its cause
        raise ConfigError(f"{kind} file {path!r} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, function):
        raise ConfigError(f"{kind} file {path!r} defines no {function}()")
    return module


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads ``path:arg`` the way ``config_flags.DEFINE_config_file`` does, then locks it."""
    if ":" in path and arg is None:
        path, arg = path.split(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module = load_python_file(path, "config", "get_config")
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not ConfigDict")
    config.lock()
    return config


def apply_override(config: ml_collections.ConfigDict, dotted: str, value_text: str) -> None:
    """Sets ``a.b.c=value`` on a locked config, parsing the value as the field's type.

    Raises ConfigError for an unknown key or a value that does not fit the field's type.
    """
    keys = dotted.split(".")
    node = config
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or k not in node:
            raise ConfigError(f"unknown config key {'.'.join(keys[: i + 1])!r} in override")
        node = node[k]
    last = keys[-1]
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
        raise ConfigError(f"unknown config key {dotted!r} in override")
    field = node._fields[last]  # noqa: SLF001 - the field type lives here, also for None
    if isinstance(field, config_dict.FieldReference):
        ftype = field.get_type()
    else:
        ftype = type(node[last])
    value = _parse_value(value_text, ftype, dotted)
    try:
        setattr(node, last, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"override {dotted}={value_text!r}: {e}") from e


def _parse_value(text: str, ftype, name: str):
    if ftype is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"override {name}={text!r}: expected a boolean")
    if ftype in (int, float, str):
        try:
            return ftype(text) if ftype is not int else int(text, 0)
        except ValueError as e:
            raise ConfigError(f"override {name}={text!r}: expected {ftype.__name__}") from e
    if ftype in (tuple, list):
        import ast

        try:
            return ftype(ast.literal_eval(text))
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"override {name}={text!r}: expected a {ftype.__name__}") from e
    raise ConfigError(f"override {name}: fields of type {ftype.__name__} cannot be overridden")


def to_dict(config) -> dict:
    """A plain JSON-able dict of the resolved config (placeholders left None)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff(stored: dict, current: dict, ignore: Iterable[str] = NON_SEMANTIC_FIELDS) -> list[str]:
    """Dotted names of fields whose values differ (missing on one side counts, but for
    an ``ADDED_FIELDS`` field, whose absence means its earlier value)."""
    a, b = _flatten(stored), _flatten(current)
    for flat in (a, b):
        for k, v in ADDED_FIELDS.items():
            flat.setdefault(k, v)
    ignore = tuple(ignore)

    def ignored(k):
        return any(k == p or k.startswith(p + ".") for p in ignore)

    return sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k) != b.get(k))


# ----------------------------------------------------------------------------- validation


def _require(config, dotted: str):
    node = config
    for k in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or k not in node:
            raise ConfigError(f"config is missing required field {dotted!r}")
        node = node[k]
    return node


def _check(cond: bool, field: str, message: str):
    if not cond:
        raise ConfigError(f"config field {field}: {message}")


def _check_type(value, types, field):
    # bool is an int in Python: do not let True pass as a step count.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    _check(ok, field, f"expected {_type_names(types)}, got {type(value).__name__} {value!r}")


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _type_names(t):
    return " or ".join(x.__name__ for x in _as_tuple(t))


def _positive_int(config, field, allow_none=False, allow_zero=False):
    v = _require(config, field)
    if v is None and allow_none:
        return None
    _check_type(v, int, field)
    _check(v > 0 or (allow_zero and v == 0), field, f"must be {'>= 0' if allow_zero else '> 0'}")
    return v


def _number(config, field, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
    v = _require(config, field)
    if v is None and allow_none:
        return None
    _check_type(v, (int, float), field)
    _check(math.isfinite(v), field, f"must be finite, got {v}")
    if lo is not None:
        _check(v > lo if lo_open else v >= lo, field, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None:
        _check(v < hi if hi_open else v <= hi, field, f"must be {'<' if hi_open else '<='} {hi}")
    return v


def _choice(config, field, choices):
    v = _require(config, field)
    _check(v in choices, field, f"{v!r} is not one of {', '.join(map(repr, choices))}")
    return v


def validate(config) -> None:
    """Checks every field the engine reads; raises ConfigError naming the first bad one."""
    from jaxrepro import models  # local: keep config import light

    seed = _require(config, "seed")
    _check_type(seed, int, "seed")
    _check(seed >= 0, "seed", "must be >= 0")
    for f in rng.FACTORS:
        v = _require(config, f"seeds.{f}")
        if v is not None:
            _check_type(v, int, f"seeds.{f}")
            _check(v >= 0, f"seeds.{f}", "must be >= 0")
    _choice(config, "model.name", models.MODEL_NAMES)
    _choice(config, "model.stem", STEMS)
    _choice(config, "model.conv_impl", CONV_IMPLS)
    _choice(config, "model.maxpool_impl", MAXPOOL_IMPLS)
    _choice(config, "model.bn_impl", models.BN_IMPLS)
    _choice(config, "model.dtype", DTYPES)
    _positive_int(config, "model.width", allow_none=True)
    _number(config, "model.dropout_rate", lo=0, hi=1, hi_open=True)
    _validate_data(config)
    _validate_optimizer(config)
    for phase in rng.PHASES:
        _validate_phase(config, phase)
    _check(
        _phase_has_work(config, "pretrain") or _phase_has_work(config, "finetune"),
        "pretrain.steps",
        "both phases have zero length; nothing to train",
    )
    init_from = _require(config, "init_from")
    if init_from is not None:
        _check_type(init_from, str, "init_from")
        _check(os.path.isdir(init_from), "init_from", f"{init_from!r} is not a directory")
    _choice(config, "train.nonfinite_policy", NONFINITE_POLICIES)
    _positive_int(config, "train.eval_batch_size")
    _positive_int(config, "checkpoint.every", allow_zero=True)
    _positive_int(config, "checkpoint.keep_last")
    _positive_int(config, "checkpoint.keep_every", allow_zero=True)
    _check_type(
        _require(config, "checkpoint.keep_phase_starts"), bool, "checkpoint.keep_phase_starts"
    )
    _validate_dropoff(config)
    _validate_parallel(config)
    _number(config, "runtime.progress_every_s", lo=0, lo_open=True)
    _choice(config, "runtime.progress", PROGRESS_MODES)
    _number(config, "runtime.heartbeat_every_s", lo=0, lo_open=True)
    _check_type(_require(config, "runtime.tensorboard"), bool, "runtime.tensorboard")
    _validate_runtime(config)


def _validate_dropoff(config):
    """The drop-off detector's thresholds (negative windows, ratios below 1, an unknown
    reference are refused here, before a run starts, not at its first metrics row)."""
    from jaxrepro import dropoff

    section = _require(config, "dropoff")
    try:
        dropoff.validate_config(section)
    except ValueError as e:
        field, _, message = str(e).partition(" ")
        raise ConfigError(f"config field dropoff.{field}: {message}") from None


def _validate_parallel(config):
    gpu_det = _require(config, "determinism.gpu_deterministic")
    _check_type(gpu_det, bool, "determinism.gpu_deterministic")
    level = _require(config, "determinism.gpu_autotune_level")
    if level is not None:
        _check_type(level, int, "determinism.gpu_autotune_level")
        _check(0 <= level <= 5, "determinism.gpu_autotune_level", f"{level} is not in [0, 5]")
    _positive_int(config, "parallel.num_devices", allow_none=True)
    _check_type(
        _require(config, "determinism.device_invariant"), bool, "determinism.device_invariant"
    )
    _check_type(_require(config, "determinism.portable"), bool, "determinism.portable")
    _positive_int(config, "diagnose.after")
    _positive_int(config, "diagnose.window")
    groups = _positive_int(config, "determinism.groups")
    if config.determinism.device_invariant:
        # The grouped forward (invariant/grouped_model.py) has no dropout: refused rather
        # than silently trained without it.
        _check(
            config.model.dropout_rate == 0,
            "model.dropout_rate",
            f"{config.model.dropout_rate} > 0 is not supported with "
            "determinism.device_invariant=True (the device-invariant step has no dropout); "
            "set model.dropout_rate=0 or determinism.device_invariant=False",
        )
        for phase in rng.PHASES:
            _check(
                config[phase].batch_size % groups == 0,
                f"{phase}.batch_size",
                f"{config[phase].batch_size} is not divisible by determinism.groups={groups}",
            )


def _validate_data(config):
    from jaxrepro import data

    for role in ("source", "target"):
        name = _require(config, f"data.{role}.name")
        _check_type(name, str, f"data.{role}.name")
        try:
            data.check_name(name)
        except data.UnknownDatasetError as e:
            raise ConfigError(f"config field data.{role}.name: {e}") from e
        for split in ("train_split", "eval_split"):
            _check_type(_require(config, f"data.{role}.{split}"), str, f"data.{role}.{split}")
    _positive_int(config, "data.image_size")
    _choice(config, "data.remainder", REMAINDERS)
    for stat in ("mean", "std"):
        v = _require(config, f"data.normalize.{stat}")
        _check(
            isinstance(v, tuple | list) and len(v) == 3, f"data.normalize.{stat}", "needs 3 values"
        )
    _check(all(s > 0 for s in config.data.normalize.std), "data.normalize.std", "must be > 0")
    aug = "data.augment"
    _number(config, f"{aug}.crop.padding", lo=0)
    _number(config, f"{aug}.flip.prob", lo=0, hi=1)
    _number(config, f"{aug}.brightness.max_delta", lo=0, hi=1)
    lo = _number(config, f"{aug}.contrast.lower", lo=0)
    _number(config, f"{aug}.contrast.upper", lo=lo)
    _choice(config, "data.on_corrupt", CORRUPT_POLICIES)
    _check_type(_require(config, "data.jpeg_draft"), bool, "data.jpeg_draft")


def _validate_runtime(config):
    workers = _positive_int(config, "runtime.data_workers", allow_zero=True)
    _check(workers <= 256, "runtime.data_workers", f"{workers} worker processes is too many")
    _positive_int(config, "runtime.data_prefetch")
    _positive_int(config, "runtime.max_in_memory_mb", allow_zero=True)


def _validate_optimizer(config):
    _choice(config, "optimizer.name", ("adam",))
    _number(config, "optimizer.lr", lo=0, lo_open=True)
    _number(config, "optimizer.b1", lo=0, hi=1, hi_open=True)
    _number(config, "optimizer.b2", lo=0, hi=1, hi_open=True)
    _number(config, "optimizer.eps", lo=0, lo_open=True)
    _number(config, "optimizer.weight_decay", lo=0)
    _number(config, "optimizer.clip_norm", lo=0, lo_open=True, allow_none=True)
    _choice(config, "optimizer.schedule", SCHEDULES)
    _positive_int(config, "optimizer.warmup_steps", allow_zero=True)


def _phase_has_work(config, phase):
    return bool(config[phase].steps) or bool(config[phase].epochs)


def _validate_phase(config, phase):
    steps = _positive_int(config, f"{phase}.steps", allow_none=True, allow_zero=True)
    epochs = _positive_int(config, f"{phase}.epochs", allow_none=True, allow_zero=True)
    _check(
        steps is None or epochs is None,
        f"{phase}.steps",
        f"set {phase}.steps or {phase}.epochs, not both",
    )
    _positive_int(config, f"{phase}.batch_size")
    _positive_int(config, f"{phase}.eval_every", allow_zero=True)
    _positive_int(config, f"{phase}.log_every")
    if phase == "finetune":
        _number(config, "finetune.lr", lo=0, lo_open=True, allow_none=True)
        _number(config, "finetune.backbone_lr_mult", lo=0)
        if _require(config, "finetune.schedule") is not None:
            _choice(config, "finetune.schedule", SCHEDULES)
        _positive_int(config, "finetune.warmup_steps", allow_zero=True, allow_none=True)
        _check_type(_require(config, "finetune.freeze_backbone"), bool, "finetune.freeze_backbone")
        _check_type(_require(config, "finetune.new_head"), bool, "finetune.new_head")


# ----------------------------------------------------------------------------- defaults


def base() -> ml_collections.ConfigDict:
    """Every field the engine reads, with defaults; experiment files change what they need.

    Seeds: ``seeds.<factor>`` left unset (None) means ``seed``; set one to vary that factor
    alone (``--config.seeds.aug=1``).
    """
    from jaxrepro.data.augment import default_augment_config

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.seeds = ml_collections.ConfigDict({f: config_dict.placeholder(int) for f in rng.FACTORS})
    c.init_from = config_dict.placeholder(str)  # a ported checkpoint dir (jaxrepro port)

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.width = config_dict.placeholder(int)  # None: the architecture's own (64)
    c.model.zero_init_residual = False
    # 'auto': 'matmul' (im2col convs, ~3x faster on XLA:CPU) on CPU, 'lax' (cuDNN) elsewhere.
    c.model.conv_impl = "auto"
    # 'deterministic': scatter-free max-pool gradient, so GPU deterministic ops work.
    c.model.maxpool_impl = "deterministic"
    # 'fused': BatchNorm with a hand-written (custom_vjp) backward, 3-12 % faster steps on
    # 1-2 CPU cores (results/bench/NOTES.md); 'flax': JAX differentiates the plain formula.
    c.model.bn_impl = "fused"
    c.model.dtype = "float32"
    # Dropout on the pooled features before the classifier, in training only; its mask
    # is drawn from the 'dropout' seed's key of the step. 0: no dropout op at all.
    c.model.dropout_rate = 0.0

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = config_dict.placeholder(
        str
    )  # None: $JAXREPRO_DATA_DIR, ~/tensorflow_datasets
    c.data.source = ml_collections.ConfigDict(
        dict(name="digits", train_split="train", eval_split="test")
    )
    c.data.target = ml_collections.ConfigDict(
        dict(name="digits_shifted", train_split="train", eval_split="test")
    )
    c.data.image_size = 32
    c.data.remainder = "drop"
    c.data.normalize = ml_collections.ConfigDict(dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    c.data.augment = default_augment_config()
    # A record whose image cannot be decoded: 'error' stops the run naming it; 'skip' fills
    # its place with the next decodable record of the split, counted in run.json.
    c.data.on_corrupt = "error"
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale where both sides stay >= image_size (libjpeg's
    # DCT scaling): faster for images far larger than image_size; changes pixels.
    c.data.jpeg_draft = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0  # decoupled (AdamW-style) when > 0
    c.optimizer.clip_norm = config_dict.placeholder(float)  # global-norm clipping
    c.optimizer.schedule = "constant"  # or 'cosine' (to 0 over the phase, after warmup)
    c.optimizer.warmup_steps = 0

    for phase in rng.PHASES:
        p = ml_collections.ConfigDict()
        p.steps = config_dict.placeholder(int)
        p.epochs = config_dict.placeholder(int)
        p.batch_size = 32
        p.eval_every = 20  # steps; 0: only at the phase's start and end
        p.log_every = 1
        c[phase] = p
    c.finetune.lr = config_dict.placeholder(float)  # None: optimizer.lr
    # None: optimizer.schedule / optimizer.warmup_steps (fine-tuning may have its own)
    c.finetune.schedule = config_dict.placeholder(str)
    c.finetune.warmup_steps = config_dict.placeholder(int)
    c.finetune.backbone_lr_mult = 1.0
    c.finetune.freeze_backbone = False
    c.finetune.new_head = True  # a new head from the 'head' seed

    c.train = ml_collections.ConfigDict()
    c.train.nonfinite_policy = "stop"  # or 'skip': leave params/opt/BN state unchanged
    c.train.eval_batch_size = 128

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50  # steps; 0: only at phase boundaries and the end
    c.checkpoint.keep_last = 3
    c.checkpoint.keep_every = 0  # also keep every k-th step for good (0: none)
    # Also keep the checkpoint at the start of each phase after the first (the fine-tune
    # start): a study's remedy arms branch from it (jaxrepro.study).
    c.checkpoint.keep_phase_starts = False

    from jaxrepro import dropoff

    c.dropoff = dropoff.default_config()  # detection thresholds (docs/design.md)

    # jaxrepro diagnose (jaxrepro/diagnose): arms run to the onset + `after` steps (or the
    # phase's end); an arm's episode of the same phase, metric and kind with an onset within
    # `window` steps of the original's counts as the event recurring.
    c.diagnose = ml_collections.ConfigDict()
    c.diagnose.after = 30
    c.diagnose.window = 10

    c.runtime = ml_collections.ConfigDict()  # does not change the trajectory
    # Progress of train, replay and diagnose: 'auto' draws a bar (steps/s, ETA) when stderr
    # is a terminal and logs a line every `progress_every_s` seconds when it is not;
    # 'bar', 'lines', 'off' force one (jaxrepro.train.progress). `jaxrepro study` logs its
    # runs' progress every `progress_every_s` too.
    c.runtime.progress = "auto"
    c.runtime.progress_every_s = 10.0
    # TensorBoard event files in WORKDIR/tb (jaxrepro.tbevents); false: none are written.
    c.runtime.tensorboard = True
    # heartbeat.json (host, pid, step, steps/s) is rewritten this often (jaxrepro status).
    c.runtime.heartbeat_every_s = 10.0
    # Train splits too large to hold in memory are read, decoded and resized ahead of the
    # step by this many worker processes (jaxrepro.data.pipeline; 0: in the training
    # process, on demand), each holding up to `data_prefetch` finished batches. The batches
    # are the same whatever these are (tests/test_pipeline.py).
    c.runtime.data_workers = 0
    c.runtime.data_prefetch = 2
    # A split whose decoded images fit in this many MiB is decoded once, at load, and held.
    c.runtime.max_in_memory_mb = 1024

    # GPU only (jaxrepro.parallel): XLA flags set before the backend starts, kept in run.json.
    c.determinism = ml_collections.ConfigDict()
    c.determinism.gpu_deterministic = True  # --xla_gpu_deterministic_ops=true
    # 0: no autotuning (it times kernels, and another run may pick others); None: XLA's own.
    c.determinism.gpu_autotune_level = config_dict.FieldReference(0, field_type=int)

    # Opt-in (jaxrepro.train.invariant): the same bits on 1, 2, 4 or 8 devices; the global batch is
    # always cut into `groups` groups whose partial sums are combined in one fixed order.
    c.determinism.device_invariant = False
    c.determinism.groups = 8
    # Opt-in (jaxrepro.machine): the same bits on every x86-64 CPU with AVX2 and FMA (and
    # the same thread count): XLA capped at AVX2, no YNNPACK fusions, matmuls contracted
    # in chunks below any cache-sized block. Slower; set before the backend starts.
    c.determinism.portable = False
    c.parallel = ml_collections.ConfigDict()  # the 'data' mesh (jaxrepro.parallel)
    c.parallel.num_devices = config_dict.placeholder(int)  # None: every device
    return c


def from_dict(stored: dict) -> ml_collections.ConfigDict:
    """Rebuilds a locked, typed config from a config.json (as written by ``to_dict``).

    Types come from ``base()``, so overrides on the result are type-checked as usual. A
    field that ``base()`` lacks is an error naming it (a config.json from another version).
    """
    config = base()
    _update(config, stored, "")
    config.lock()
    return config


def _update(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in node:
            raise ConfigError(f"stored config has field {name!r} that this version does not know")
        if isinstance(value, dict):
            _update(node[key], value, name + ".")
        else:
            setattr(node, key, tuple(value) if isinstance(value, list) else value)
