"""Weight port between torchvision-format ResNet state_dicts and jaxrepro's Flax ResNet.

The mapping, key by key (torch ``state_dict`` key -> Flax variable path):

=====================================  ==================================================
``conv1.weight`` (O, I, H, W)           ``params/conv1/kernel`` (H, W, I, O)
``bn1.weight`` / ``bn1.bias``           ``params/bn1/scale`` / ``params/bn1/bias``
``bn1.running_mean`` / ``running_var``  ``batch_stats/bn1/mean`` / ``batch_stats/bn1/var``
``bn1.num_batches_tracked``             dropped (recreated on the way back)
``layer{i}.{j}.conv{k}`` / ``bn{k}``    ``layer{i}_{j}/conv{k}`` / ``bn{k}``
``layer{i}.{j}.downsample.0`` / ``.1``  ``layer{i}_{j}/downsample_conv`` / ``downsample_bn``
``fc.weight`` (out, in) / ``fc.bias``   ``params/fc/kernel`` (in, out) / ``params/fc/bias``
=====================================  ==================================================

Only transposes are applied, so a round trip torch -> Flax -> torch is bitwise exact.
Architecture hyperparameters that the weights determine (number of classes, width, stem)
are read from the weights when not given.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from jaxrepro import ported
from jaxrepro.compare import torch_resnet
from jaxrepro.ported import FORMAT, PortError

__all__ = [
    "FORMAT", "PortError", "flax_to_torch", "load_flax", "load_torch_file",
    "normalize_state_dict", "save_flax", "torch_to_flax",
]  # fmt: skip

_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_WRAPPER_KEYS = ("state_dict", "model")
_LIST_LIMIT = 25


def _flax_location(torch_key: str) -> tuple[str, tuple[str, ...]] | None:
    """(collection, module path + leaf name) for a torch key; None for num_batches_tracked."""
    parts = torch_key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0].startswith("layer") and len(parts) >= 4:
        block = f"{parts[0]}_{parts[1]}"
        rest = parts[2:]
        if rest[0] == "downsample":
            rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn", *rest[2:]]
        modules = (block, rest[0])
    else:
        modules, rest = (parts[0],), parts
    module, field = rest[0], rest[-1]
    if module.startswith("conv") or module == "downsample_conv":
        return "params", (*modules, "kernel")
    if module == "fc":
        return "params", (*modules, "kernel" if field == "weight" else "bias")
    collection, leaf = _BN_FIELDS[field]
    return collection, (*modules, leaf)


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # conv OIHW -> HWIO
        return np.transpose(array, (2, 3, 1, 0))
    return array.T if array.ndim == 2 else array  # fc (out, in) -> (in, out)


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # conv HWIO -> OIHW
        return np.transpose(array, (3, 2, 0, 1))
    return array.T if array.ndim == 2 else array


def _format_problems(what: str, missing, extra, shapes, hint: str = "") -> str:
    def listing(title, items):
        items = list(items)
        if not items:
            return []
        shown = [f"    {s}" for s in items[:_LIST_LIMIT]]
        if len(items) > _LIST_LIMIT:
            shown.append(f"    ... and {len(items) - _LIST_LIMIT} more")
        return [f"  {title} ({len(items)}):", *shown]

    lines = [what]
    lines += listing("missing keys", missing)
    lines += listing("unexpected keys", extra)
    lines += listing("wrong shapes", shapes)
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def _hint(keys: set[str], num_classes: int, width: int, stem: str) -> str:
    """A hint for an error message: a wrapper prefix to strip, or the arch the keys fit."""
    heads = {k.split(".", 1)[0] for k in keys}
    if len(heads) == 1 and len(keys) > 1:  # e.g. a LightningModule's 'model.' attribute
        (head,) = heads
        return f"  Every key starts with {head + '.'!r}: strip that prefix first."
    for arch in torch_resnet.ARCHS:
        expected = torch_resnet.expected_shapes(arch, num_classes, width, stem)
        if {k for k in expected if not k.endswith("num_batches_tracked")} == keys:
            return f"  The keys match {arch}: pass arch={arch!r}."
    return ""


def normalize_state_dict(obj) -> OrderedDict[str, torch.Tensor]:
    """Unwraps a checkpoint into a plain state_dict of tensors.

    Accepts a state_dict, or a checkpoint dict that wraps one under ``'state_dict'`` or
    ``'model'`` (also nested), and strips the ``'module.'`` prefix that DataParallel and
    DistributedDataParallel add. NumPy arrays are accepted as values.

    Raises:
      PortError: if no mapping of names to tensors can be found.
    """
    for _ in range(3):
        if not isinstance(obj, Mapping):
            raise PortError(f"expected a state_dict (a mapping), got {type(obj).__name__}")
        inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not inner:
            break
        obj = obj[inner[0]]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor | np.ndarray)]
    if bad or not all(isinstance(k, str) for k in obj):
        raise PortError(
            "not a state_dict of tensors; entries that are not tensors: "
            f"{sorted(map(str, bad))[:_LIST_LIMIT]} (a checkpoint should wrap the weights "
            f"under one of {_WRAPPER_KEYS})"
        )
    strip = bool(obj) and all(k.startswith("module.") for k in obj)
    return OrderedDict(
        (k[len("module.") :] if strip else k, torch.as_tensor(v)) for k, v in obj.items()
    )


def _infer_from_torch(sd, num_classes, width, stem) -> tuple[int, int | None, str]:
    if num_classes is None:
        num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 1000
    conv1 = sd.get("conv1.weight")
    if width is None and conv1 is not None:
        width = int(conv1.shape[0])
    if stem is None:
        stem = "cifar" if conv1 is not None and conv1.shape[-1] == 3 else "imagenet"
    return num_classes, width, stem


def torch_to_flax(
    state_dict,
    arch: str,
    *,
    num_classes: int | None = None,
    width: int | None = None,
    stem: str | None = None,
) -> dict[str, dict]:
    """Converts a torchvision-format ResNet state_dict into Flax variables.

    Args:
      state_dict: a state_dict, or a checkpoint dict wrapping one (see
        ``normalize_state_dict``).
      arch: resnet18/34/50/101/152 or resnet_tiny.
      num_classes: outputs of ``fc``; None reads it from ``fc.weight``.
      width: channels of the stem and stage 1; None reads it from ``conv1.weight``.
      stem: ``'imagenet'`` or ``'cifar'``; None reads it from the size of ``conv1``'s kernel.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` as nested dicts of float32 NumPy arrays.

    Raises:
      PortError: listing every missing key, unexpected key and wrong shape.
    """
    sd = normalize_state_dict(state_dict)
    num_classes, width, stem = _infer_from_torch(sd, num_classes, width, stem)
    expected = torch_resnet.expected_shapes(arch, num_classes, width, stem)
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    extra = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: got {tuple(sd[k].shape)}, {arch} needs {expected[k]}"
        for k in sd
        if k in expected and tuple(sd[k].shape) != expected[k]
    ]
    if missing or extra or shapes:
        hint = _hint(
            {k for k in sd if not k.endswith("num_batches_tracked")}, num_classes, width, stem
        )
        raise PortError(
            _format_problems(f"state_dict does not fit {arch}:", missing, extra, shapes, hint)
        )
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, tensor in sd.items():
        location = _flax_location(key)
        if location is None:
            continue
        collection, path = location
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        array = tensor.detach().to(torch.float32).cpu().numpy()
        node[path[-1]] = np.ascontiguousarray(_to_flax_layout(array))
    return variables


_flatten = ported.flatten
_infer_from_flax = ported.infer_fields


def flax_to_torch(
    variables, arch: str, *, num_batches_tracked: int = 0
) -> OrderedDict[str, torch.Tensor]:
    """Converts Flax variables back into a torchvision-format state_dict.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` (dicts or FrozenDicts of NumPy or
        JAX arrays), as made by ``jaxrepro.models.build(arch, ...)`` or ``torch_to_flax``.
      arch: resnet18/34/50/101/152 or resnet_tiny.
      num_batches_tracked: the value of every BatchNorm's ``num_batches_tracked`` buffer,
        which Flax does not keep.

    Returns:
      An OrderedDict in ``state_dict`` order that ``load_state_dict(strict=True)`` accepts.

    Raises:
      PortError: listing every missing variable, unexpected variable and wrong shape.
    """
    flat = _flatten({c: variables.get(c, {}) for c in ("params", "batch_stats")})
    extra_collections = sorted(set(variables) - {"params", "batch_stats"})
    num_classes, width, stem = _infer_from_flax(flat)
    expected = torch_resnet.expected_shapes(arch, num_classes, width, stem)
    out, missing, shapes, used = OrderedDict(), [], [], set()
    for key, shape in expected.items():
        location = _flax_location(key)
        if location is None:
            out[key] = torch.tensor(num_batches_tracked, dtype=torch.long)
            continue
        path = (location[0], *location[1])
        used.add(path)
        if path not in flat:
            missing.append("/".join(path))
            continue
        array = _to_torch_layout(np.asarray(flat[path], dtype=np.float32))
        if array.shape != shape:
            shapes.append(f"{'/'.join(path)}: got {np.shape(flat[path])}, {arch} needs {shape}")
            continue
        out[key] = torch.from_numpy(np.array(array, order="C", copy=True))
    extra = ["/".join(p) for p in flat if p not in used] + extra_collections
    if missing or extra or shapes:
        raise PortError(
            _format_problems(f"Flax variables do not fit {arch}:", missing, extra, shapes)
        )
    return out


def _refusal_detail(error: Exception) -> str:
    """The line of torch's long refusal message that names the offending global or opcode."""
    text = str(error)
    start = text.find("WeightsUnpickler error:")
    if start < 0:
        return text.splitlines()[0] if text else ""
    detail = " ".join(text[start:].split("Check the documentation")[0].split())
    return detail.split(" Please use")[0]


def load_torch_file(path: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """Reads a state_dict from a .pt/.pth file or a .safetensors file.

    PyTorch files are loaded with ``weights_only=True``: a pickle that holds anything but
    tensors and plain containers (and so could run code while loading) is refused.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      PortError: if the file is refused, truncated, corrupt, or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise PortError(
                f"cannot read safetensors file {path} (truncated or corrupt?): {e}"
            ) from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" not in str(e).lower():
                raise PortError(f"cannot read {path} (truncated or corrupt?): {e}") from None
            raise PortError(
                f"refused to load {path}: it holds Python objects other than tensors, which "
                "could run code when unpickled (loaded with weights_only=True). Re-save the "
                f"weights alone with torch.save(model.state_dict(), ...). {_refusal_detail(e)}"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise PortError(f"cannot read {path} (truncated or not a PyTorch file?): {e}") from e
    return normalize_state_dict(obj)


def save_flax(
    variables, arch: str, out_dir: str | os.PathLike, *, overwrite: bool = False, **info
) -> Path:
    """Writes ported Flax variables to ``out_dir`` as ``variables.npz`` + ``meta.json``.

    The arrays are checked against ``arch`` first. ``meta.json`` records the format, arch,
    num_classes, width and stem (what ``jaxrepro.models.build`` needs) plus ``info``
    (e.g. ``source='resnet50.pth'``). See ``jaxrepro.ported.write``.

    Raises:
      PortError: if the variables do not fit ``arch``.
      FileExistsError: if ``out_dir`` already holds files and ``overwrite`` is False.
    """
    return ported.write(variables, arch, out_dir, overwrite=overwrite, **info)


def load_flax(in_dir: str | os.PathLike) -> tuple[dict[str, dict], dict]:
    """Reads what ``save_flax`` wrote (``jaxrepro.ported.load``: no torch needed).

    Returns:
      ``(variables, meta)``: variables as nested dicts of NumPy arrays, and the meta dict
      (``arch``, ``num_classes``, ``width``, ``stem``, ...) for ``jaxrepro.models.build``.
    """
    return ported.load(in_dir)
