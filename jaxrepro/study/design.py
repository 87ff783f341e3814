r"""A study design file: named arms, each its own seeds, factors and config overrides.

    jaxrepro study --design=configs/studies/paper.py[:variant] --out=DIR [--arms=a,b]

A design file is Python with ``get_design(variant=None)`` returning a dict (or an
``ml_collections.ConfigDict``)::

    {
        "config": "../digits.py",      # the base config, path[:variant], relative to
                                       # this file's folder (--config replaces it)
        "description": "...",          # optional
        "overrides": {"key": value},   # optional: applied to every arm (the base config)
        "arms": [                      # the first arm is the baseline
            {"name": "pad4", "vary": "aug", "seeds": "0-7"},
            {"name": "pad3", "overrides": {"data.augment.crop.padding": 3}},
            {"name": "lr_half", "overrides": {"finetune.lr": 1.5e-3}, "branch": "finetune"},
        ],
    }

Arm keys: ``name`` (required; letters, digits, ``_ . -``), ``vary`` (as ``--vary``) and
``seeds`` (as ``--seeds``), both defaulting to the baseline's; ``overrides`` (dotted
config key -> value, checked against the field's type); ``branch``: ``None`` (a full run
per seed) or ``"finetune"``: each run is a replay of the baseline run of the same seeds
from its checkpoint at the start of fine-tuning, with the overrides applied there, so
pretraining is shared bit for bit and the comparison is paired by seed; ``description``.
A branch may only change what can change at the pretrain -> fine-tune boundary
(optimizer, fine-tuning, augmentation, and fields that do not touch the trajectory).
"""

from __future__ import annotations

import dataclasses
import os
import re

import ml_collections

from jaxrepro import config as config_lib
from jaxrepro import rng
from jaxrepro.errors import ConfigError
from jaxrepro.study import plan

DESIGN_KEYS = ("config", "description", "overrides", "arms")
ARM_KEYS = ("name", "vary", "seeds", "overrides", "branch", "description")
BRANCH_POINTS = ("finetune",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a branch from the fine-tune start may change: these take effect from that step.
BRANCH_ALLOWED = (
    "optimizer.",
    "finetune.",
    "data.augment.",
    "train.",
    "dropoff.",
    "diagnose.",
    "checkpoint.",
    "runtime.",
)
# ... but not these, which the boundary has already consumed (or which name the data).
_BRANCH_CONSUMED = ("finetune.new_head",)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of a design: its runs are its seeds of its factors, with its overrides."""

    name: str
    factors: tuple[str, ...]
    design: str  # 'oat' | 'grid', as --vary
    seeds: tuple[int, ...]
    overrides: tuple[tuple[str, str], ...] = ()  # (dotted key, value text)
    branch: str | None = None  # None | 'finetune'
    description: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "vary": list(self.factors),
            "design": self.design,
            "seeds": list(self.seeds),
            "overrides": [[k, v] for k, v in self.overrides],
            "branch": self.branch,
            "description": self.description,
        }


@dataclasses.dataclass(frozen=True)
class Design:
    """A parsed design file: where it came from, its base config, its arms."""

    source: str  # the --design argument, as given
    config: str | None  # the base config path[:variant], resolved (None: --config)
    arms: tuple[Arm, ...]
    overrides: tuple[tuple[str, str], ...] = ()
    description: str = ""

    @property
    def baseline(self) -> Arm:
        return self.arms[0]


def value_text(value) -> str:
    """A design's override value as the text ``--config.key=TEXT`` takes."""
    if isinstance(value, str):
        return value
    if value is None:
        raise ConfigError("None cannot be given as an override value")
    return repr(value) if isinstance(value, tuple | list) else str(value)


def _overrides(raw, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if isinstance(raw, ml_collections.ConfigDict):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'overrides' must be a dict of dotted key -> value")
    out = []
    for key, value in raw.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{where}: override key {key!r} is not a dotted config key")
        try:
            out.append((key.strip(), value_text(value)))
        except ConfigError as e:
            raise ConfigError(f"{where}: override {key}: {e}") from e
    return tuple(out)


def _refuse_unknown(where: str, given, known) -> None:
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: " + ", ".join(known)
        )


def load(argument: str) -> Design:
    """Loads and checks ``FILE[:variant]`` (ConfigError naming what is wrong)."""
    path, _, variant = str(argument).partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--design={argument}: design file {path!r} does not exist")
    module = config_lib.load_python_file(path, "design", "get_design")
    try:
        raw = module.get_design(variant or None)
    except (ValueError, KeyError, TypeError) as e:  # e.g. an unknown variant
        raise ConfigError(f"--design={argument}: {e}") from e
    if isinstance(raw, ml_collections.ConfigDict):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: get_design() returned {type(raw).__name__}, not a dict")
    where = f"design {argument}"
    _refuse_unknown(where, raw, DESIGN_KEYS)
    config = raw.get("config")
    if config is not None:
        if not isinstance(config, str) or not config:
            raise ConfigError(f"{where}: 'config' must be a config file path[:variant]")
        cpath, colon, cvariant = config.partition(":")
        if not os.path.isabs(cpath):
            cpath = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), cpath))
        config = cpath + colon + cvariant
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, list | tuple) or not arms_raw:
        raise ConfigError(f"{where}: 'arms' must be a non-empty list of arms")
    arms, first = [], None
    for i, a in enumerate(arms_raw):
        if isinstance(a, ml_collections.ConfigDict):
            a = a.to_dict()
        if not isinstance(a, dict):
            raise ConfigError(f"{where}: arm {i} is a {type(a).__name__}, not a dict")
        name = a.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"{where}: arm {i} needs a 'name' of letters, digits, '_', '.', '-' (got {name!r})"
            )
        at = f"{where}, arm {name!r}"
        _refuse_unknown(at, a, ARM_KEYS)
        if any(x.name == name for x in arms):
            raise ConfigError(f"{where}: two arms are named {name!r}")
        vary = a.get("vary", None if first is None else ",".join(first.factors))
        if first is not None and first.design == "grid" and "vary" not in a:
            vary = "*".join(first.factors)
        if vary is None:
            raise ConfigError(f"{at}: the first arm (the baseline) needs 'vary'")
        seeds = a.get("seeds", None if first is None else list(first.seeds))
        if seeds is None:
            raise ConfigError(f"{at}: the first arm (the baseline) needs 'seeds'")
        try:
            factors, design = plan.parse_vary(vary)
            seeds = plan.parse_seeds(seeds)
        except ConfigError as e:
            raise ConfigError(f"{at}: {e}") from e
        branch = a.get("branch")
        if branch is not None and branch not in BRANCH_POINTS:
            raise ConfigError(
                f"{at}: branch={branch!r}; known: None (full runs) or "
                + ", ".join(map(repr, BRANCH_POINTS))
            )
        if branch is not None and first is None:
            raise ConfigError(f"{at}: the first arm is the baseline and cannot be a branch")
        arm = Arm(
            name=name,
            factors=factors,
            design=design,
            seeds=seeds,
            overrides=_overrides(a.get("overrides"), at),
            branch=branch,
            description=str(a.get("description") or ""),
        )
        arms.append(arm)
        first = first or arm
    return Design(
        source=str(argument),
        config=config,
        arms=tuple(arms),
        overrides=_overrides(raw.get("overrides"), where),
        description=str(raw.get("description") or ""),
    )


def select(design: Design, names) -> Design:
    """Only the arms named (``--arms=a,b``), in the design's order; the baseline stays
    first (and is kept when a branch arm needs it)."""
    if not names:
        return design
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    known = [a.name for a in design.arms]
    for n in names:
        if n not in known:
            raise ConfigError(
                f"--arms: no arm named {n!r} in {design.source}; known: {', '.join(known)}"
            )
    chosen = [a for a in design.arms if a.name in names]
    if any(a.branch for a in chosen) and design.baseline not in chosen:
        raise ConfigError(
            f"--arms: {', '.join(a.name for a in chosen if a.branch)} branch(es) from the "
            f"baseline arm {design.baseline.name!r}: name it too"
        )
    return dataclasses.replace(design, arms=tuple(chosen))


def check_branch_override(arm: Arm, key: str, base_config) -> None:
    """Refuses an override a branch from the fine-tune start cannot apply there."""
    where = f"arm {arm.name!r} (branch from the fine-tune start)"
    if key.startswith("model.") or key == "data.image_size" or key == "init_from":
        raise ConfigError(
            f"{where}: override {key} would change the architecture mid-run; a branch "
            "keeps the pretrained network. Make it a full-run arm (no 'branch') instead"
        )
    if key.startswith("pretrain."):
        raise ConfigError(
            f"{where}: override {key} changes pretraining, which a branch shares with its "
            "baseline run; make it a full-run arm instead"
        )
    if key == "seed" or key.startswith("seeds."):
        raise ConfigError(
            f"{where}: override {key}: a branch has its baseline run's seeds (its own are "
            "the arm's 'seeds')"
        )
    if key in _BRANCH_CONSUMED or not key.startswith(BRANCH_ALLOWED):
        raise ConfigError(
            f"{where}: override {key} cannot change at the pretrain -> fine-tune boundary; "
            f"a branch may change {', '.join(p + '*' for p in BRANCH_ALLOWED)} "
            f"(not {', '.join(_BRANCH_CONSUMED)})"
        )
    if key == "optimizer.lr" and base_config.finetune.lr is not None:
        raise ConfigError(
            f"{where}: override optimizer.lr changes nothing in fine-tuning, whose learning "
            f"rate is finetune.lr={base_config.finetune.lr}; override finetune.lr"
        )
    for field in ("schedule", "warmup_steps"):
        own = base_config.finetune.get(field)
        if key == f"optimizer.{field}" and own is not None:
            raise ConfigError(
                f"{where}: override {key} changes nothing in fine-tuning, whose own is "
                f"finetune.{field}={own!r}; override finetune.{field}"
            )


def checked_config(base_config, overrides, where: str):
    """A copy of ``base_config`` with ``overrides`` applied and validated."""
    config = plan.copy_config(base_config)
    for k, v in overrides:
        try:
            config_lib.apply_override(config, k, v)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    try:
        config_lib.validate(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return config


def base_config(design: Design, config=None):
    """The design's base config (``config``, from --config, replaces the file's), with the
    design's own overrides applied and validated."""
    if config is None:
        if design.config is None:
            raise ConfigError(f"design {design.source} names no 'config'; give --config")
        config = config_lib.load_config_file(design.config)
    return checked_config(config, design.overrides, f"design {design.source}")


def finetune_start(config) -> int:
    """The global step where fine-tuning starts (the pretraining's length)."""
    from jaxrepro import data as data_lib
    from jaxrepro.train.setup import phase_steps

    p, n = config.pretrain, 0
    if p.steps is None and p.epochs:  # its length depends on the source's size
        d = config.data
        n = len(
            data_lib.load(
                d.source.name,
                d.source.train_split,
                data_dir=d.data_dir,
                image_size=d.image_size,
                max_in_memory_bytes=0,
            )
        )
    return phase_steps(config, "pretrain", n)


def spec_of(design: Design) -> plan.Spec:
    """The study's spec: the union of the arms' factors and seeds, and the arms."""
    factors = tuple(dict.fromkeys(f for a in design.arms for f in a.factors))
    seeds = tuple(sorted({s for a in design.arms for s in a.seeds}))
    return plan.Spec(
        factors,
        "arms",
        seeds,
        arms=tuple(a.to_dict() for a in design.arms),
        source=design.source,
    )


def plan_design(config, design: Design) -> list[plan.Run]:
    """Every arm's runs (the baseline's first), each arm checked as a config first.

    ``config``: the base config (``base_config``). A branch arm must vary the baseline's
    factors, over seeds the baseline runs; its runs restore the baseline run of the same
    seeds at the fine-tune start, which then keeps that checkpoint
    (``checkpoint.keep_phase_starts``) until its branches are done.
    """
    baseline = design.baseline
    base_cfg = checked_config(config, baseline.overrides, f"arm {baseline.name!r}")
    runs, base_names = [], {}
    for arm in design.arms:
        where = f"arm {arm.name!r}"
        if arm.branch:
            if (arm.factors, arm.design) != (baseline.factors, baseline.design):
                raise ConfigError(
                    f"{where} branches from the baseline arm {baseline.name!r}, so it varies "
                    f"its factors ({', '.join(baseline.factors)}), not "
                    f"{', '.join(arm.factors)}"
                )
            missing = [s for s in arm.seeds if s not in baseline.seeds]
            if missing:
                raise ConfigError(
                    f"{where}: seed(s) {', '.join(map(str, missing))} have no baseline run "
                    f"to branch from (arm {baseline.name!r} runs seeds "
                    f"{', '.join(map(str, baseline.seeds))})"
                )
            for k, _ in arm.overrides:
                check_branch_override(arm, k, base_cfg)
            checked = checked_config(base_cfg, arm.overrides, where)
            if not checked.finetune.steps and not checked.finetune.epochs:
                raise ConfigError(f"{where}: fine-tuning has no steps to branch into")
            from_step = finetune_start(base_cfg)
        else:
            checked = checked_config(config, arm.overrides, where)
        spec = plan.Spec(arm.factors, arm.design, arm.seeds)
        if "dropout" in arm.factors and not plan.has_dropout(checked):
            raise ConfigError(
                f"{where} varies 'dropout' but model.dropout_rate is 0: every dropout seed "
                "would train the same run"
            )
        for combo in plan._seed_combos(spec, rng.resolve_seeds(checked)):  # noqa: SLF001
            label = "-".join(f"{f}{combo[f]}" for f in arm.factors)
            name = f"{arm.name}_{label}"
            if arm.branch:
                branch = {"run": base_names[label], "from_step": from_step, "at": arm.branch}
                runs.append(plan.Run(name, arm.name, combo, arm.overrides, arm.name, branch))
                continue
            seed_overrides = tuple((f"seeds.{f}", str(s)) for f, s in combo.items())
            runs.append(plan.Run(name, arm.name, combo, arm.overrides + seed_overrides, arm.name))
            if arm is baseline:
                base_names[label] = name
    branched = {r.branch["run"] for r in runs if r.branch}
    keep = (("checkpoint.keep_phase_starts", "True"),)
    return [
        dataclasses.replace(r, overrides=r.overrides + keep) if r.name in branched else r
        for r in runs
    ]
