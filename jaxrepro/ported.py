"""A ported checkpoint directory (what ``jaxrepro port`` writes): ``variables.npz`` + ``meta.json``.

Reading one needs NumPy and JAX only: ``jaxrepro train --config.init_from=DIR`` loads it
without importing torch. Making one from a PyTorch file is ``compare/torch_port.py``'s job
(it imports torch), and writes through ``write`` here.

``variables.npz`` holds one float32 array per Flax variable, named by its path
(``params/layer1_0/conv1/kernel``, ``batch_stats/bn1/mean``); ``meta.json`` records the
format, the arch and what ``jaxrepro.models.build`` needs besides (num_classes, width, stem).
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxrepro.errors import JaxreproError

FORMAT = "jaxrepro.ported/1"
META_FILE = "meta.json"
ARRAYS_FILE = "variables.npz"
COLLECTIONS = ("params", "batch_stats")
_LIST_LIMIT = 25


class PortError(JaxreproError, ValueError):
    """A checkpoint that cannot be ported: unreadable, refused, or of another architecture."""


def flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    """Nested mappings -> ``{path tuple: leaf}``."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def infer_fields(flat) -> tuple[int, int | None, str]:
    """(num_classes, width, stem) that flattened Flax variables determine."""
    fc_bias = flat.get(("params", "fc", "bias"))
    kernel = flat.get(("params", "conv1", "kernel"))
    num_classes = int(np.shape(fc_bias)[0]) if fc_bias is not None else 1000
    width = int(np.shape(kernel)[-1]) if kernel is not None else None
    stem = "cifar" if kernel is not None and np.shape(kernel)[0] == 3 else "imagenet"
    return num_classes, width, stem


@functools.lru_cache(maxsize=16)
def expected_shapes(arch: str, num_classes: int, width: int | None, stem: str) -> dict:
    """``{path tuple: shape}`` of the Flax model's params and batch_stats (traced, not run)."""
    import jax
    import jax.numpy as jnp

    from jaxrepro import models, rng

    module = models.build(arch, num_classes, stem=stem, width=width)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)  # shapes do not depend on the image size
    shapes = jax.eval_shape(
        lambda k: module.init({"params": k}, x, train=False), rng.factor_root("init", 0)
    )
    flat = flatten({c: shapes[c] for c in COLLECTIONS})
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_fits(flat, arch: str) -> None:
    """Raises PortError listing every missing variable, unexpected one and wrong shape."""
    from jaxrepro import models

    if arch not in models.MODEL_NAMES:
        raise PortError(f"unknown arch {arch!r}; known: {', '.join(models.MODEL_NAMES)}")
    expected = expected_shapes(arch, *infer_fields(flat))
    missing = ["/".join(p) for p in expected if p not in flat]
    extra = ["/".join(p) for p in flat if p not in expected]
    shapes = [
        f"{'/'.join(p)}: got {tuple(np.shape(v))}, {arch} needs {expected[p]}"
        for p, v in flat.items()
        if p in expected and tuple(np.shape(v)) != expected[p]
    ]
    if missing or extra or shapes:
        lines = [f"Flax variables do not fit {arch}:"]
        for title, items in (("missing", missing), ("unexpected", extra), ("wrong shapes", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {s}" for s in items[:_LIST_LIMIT]]
        raise PortError("\n".join(lines))


def write(variables, arch: str, out_dir, *, overwrite: bool = False, **info) -> Path:
    """Writes ``{'params', 'batch_stats'}`` of ``arch`` to ``out_dir`` (checked first).

    Raises:
      PortError: if the variables do not fit ``arch``.
      FileExistsError: if ``out_dir`` already holds files and ``overwrite`` is False.
    """
    flat = flatten({c: variables[c] for c in COLLECTIONS})
    check_fits(flat, arch)
    num_classes, width, stem = infer_fields(flat)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"/".join(p): np.asarray(v, dtype=np.float32) for p, v in flat.items()}
    with open(out / (ARRAYS_FILE + ".tmp"), "wb") as f:
        np.savez(f, **arrays)
    os.replace(out / (ARRAYS_FILE + ".tmp"), out / ARRAYS_FILE)
    meta = dict(info, format=FORMAT, arch=arch, num_classes=num_classes, width=width, stem=stem)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load(in_dir) -> tuple[dict[str, dict], dict]:
    """Reads what ``write`` wrote.

    Returns:
      ``(variables, meta)``: variables as nested dicts of NumPy arrays, and the meta dict
      (``arch``, ``num_classes``, ``width``, ``stem``, ...) for ``jaxrepro.models.build``.

    Raises:
      FileNotFoundError: if a file is missing.
      PortError: if the files are corrupt or the arrays do not fit the recorded arch.
    """
    from jaxrepro import models

    in_dir = Path(in_dir)
    for name in (META_FILE, ARRAYS_FILE):
        if not (in_dir / name).is_file():
            raise FileNotFoundError(f"{in_dir} is not a ported checkpoint: no {name}")
    try:
        meta = json.loads((in_dir / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise PortError(f"corrupt {in_dir / META_FILE}: {e}") from None
    if meta.get("format") != FORMAT or meta.get("arch") not in models.MODEL_NAMES:
        raise PortError(f"{in_dir / META_FILE}: unknown format or arch: {meta}")
    variables: dict[str, dict] = {}
    try:
        with np.load(in_dir / ARRAYS_FILE, allow_pickle=False) as npz:
            for key in npz.files:
                *path, leaf = key.split("/")
                node = variables
                for name in path:
                    node = node.setdefault(name, {})
                node[leaf] = npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise PortError(f"corrupt {in_dir / ARRAYS_FILE}: {e}") from None
    flat = flatten(variables)
    check_fits(flat, meta["arch"])
    fields = ("num_classes", "width", "stem")
    inferred = dict(zip(fields, infer_fields(flat), strict=True))
    wrong = {k: (meta.get(k), v) for k, v in inferred.items() if meta.get(k) != v}
    if wrong:
        raise PortError(f"{in_dir}: meta.json disagrees with the arrays (meta, arrays): {wrong}")
    return variables, meta
