"""Orbax checkpoints with a manifest of per-array hashes, and our own retention.

A checkpoint holds the whole TrainState (params, batch_stats, opt_state, step, non-finite
count) and a JSON ``meta`` item: phase, architecture, and a crc32 of every array (checked
on restore; older checkpoints carry sha256 digests, which are checked as such). Keys
are derived and the data position is the step, so neither is stored.

The state is stored *packed*: one flat array per dtype (``packed/float32.bin``,
``packed/int32.bin``), the leaves concatenated in the order that ``meta['layout']``
lists, with their shapes in ``meta['shapes']``. The packed copy is made into host
buffers that every save of a run reuses, and written as raw files around the page cache
(``rawio``: ``O_DIRECT``, buffered where the filesystem refuses it). Against one orbax
array per leaf that is a fraction of the CPU a save takes from training on a 2-core
machine and ~540 MiB less peak memory in a digits run (``jaxrepro bench checkpoint``;
results/bench/NOTES.md, "End to end"). ``Checkpoints.restore`` and ``arrays`` give the
tree back; older layouts are still read: the packed arrays as orbax arrays (``state``
item, ``packed-v1``) and one orbax array per leaf (no ``layout``).

Retention is ours, not orbax's ``max_to_keep``: keep the latest ``keep_last``, every
``keep_every``-th step, and every *protected* step (the checkpoint before each recorded
drop-off), so that a drop-off can always be replayed from just before it.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from jaxrepro import machine
from jaxrepro.checkpoints import rawio
from jaxrepro.errors import CheckpointError
from jaxrepro.plumbing import hashing

MANIFEST_ALGO = "crc32"  # per-array checksums of new checkpoints (hashing.leaf_checksums)
LAYOUT = "packed-raw-v1"  # meta['layout']['format'] of new checkpoints (item 'packed')
ORBAX_PACKED = "packed-v1"  # the packed arrays as orbax arrays (item 'state'), read only
SAVE_LAYOUTS = ("raw", "orbax-packed", "leaves")  # Checkpoints.save(layout=...)
_SAVE_THREADS = 4  # at most, for a save's copy and checksums (fewer with fewer cores)


def _options(read_only: bool = False) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=None,
        create=not read_only,
        read_only=read_only,
        # Half-written saves from a kill live in tmp dirs: never listed, removed here.
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True,
    )


class Checkpoints:
    """A run's checkpoint directory."""

    def __init__(self, directory: str, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=_options(read_only),
            item_handlers={
                # Uncompressed: zstd gains ~8 % on float32 weights and Adam moments but
                # costs 2-3x the CPU time of a save (results/bench/NOTES.md).
                "state": ocp.PyTreeCheckpointHandler(
                    use_compression=False, type_handler_registry=_registry()
                ),
                "meta": ocp.JsonCheckpointHandler(),
                "packed": rawio.RawArraysHandler(),
            },
        )
        # The packed state's host buffers, one per dtype, reused by every save of this
        # run: fresh memory for 269 MiB costs more than writing it (see ``_buffers``).
        self._host: dict[str, np.ndarray] = {}

    # -- listing
    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_at_or_before(self, step: int) -> int | None:
        before = [s for s in self.steps() if s <= step]
        return before[-1] if before else None

    # -- saving
    def save(self, step: int, state, meta: dict, *, layout: str = "raw") -> None:
        """Starts an async save; ``wait()`` before relying on it (and before exit).

        Blocks until the state is computed (the manifest needs its bytes), not for the
        write; the packed copy is the save's own, so the caller may donate ``state``.
        ``layout`` (for ``jaxrepro bench checkpoint``): ``"orbax-packed"`` writes the
        packed arrays through orbax (the layout before raw files), ``"leaves"`` one orbax
        array per leaf (before packing; the caller must not donate ``state`` before
        ``wait()``, as orbax copies it asynchronously).
        """
        if layout not in SAVE_LAYOUTS:
            raise ValueError(f"unknown checkpoint layout {layout!r}; one of {SAVE_LAYOUTS}")
        tree = serialization.to_state_dict(state)
        shapes = _shapes(tree)
        meta = dict(meta, step=int(step), manifest_algo=MANIFEST_ALGO, shapes=shapes)
        if layout != "leaves":
            order = _order(tree)
            names = {dt: names for dt, (names, _) in order.items()}
            # The previous save may still be writing from the buffers being refilled.
            self._mngr.wait_until_finished()
            host = self._buffers(order)
            views = _unpack_host(host, names, shapes)
            jobs = [
                (n, views[n], x) for ns, xs in order.values() for n, x in zip(ns, xs, strict=True)
            ]
            meta["manifest"] = _fill_and_checksum(jobs)
            if layout == "raw":
                meta["layout"] = {"format": LAYOUT, "order": names}
                item = {"packed": rawio.RawArraysSave(host)}
            else:
                # orbax refuses empty arrays: a dtype whose leaves are all empty is in the
                # layout only
                stored = {dt: buf for dt, buf in host.items() if buf.size}
                meta["layout"] = {"format": ORBAX_PACKED, "order": names}
                item = {"state": ocp.args.PyTreeSave(stored)}
        else:
            meta["manifest"] = hashing.leaf_checksums(tree, MANIFEST_ALGO)
            item = {"state": ocp.args.PyTreeSave(tree)}
        self._mngr.save(int(step), args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **item))

    def _buffers(self, order: dict) -> dict[str, np.ndarray]:
        """This run's host buffers for the packed state, one per dtype, sized for ``order``.

        Every save of a run reuses the same buffers, whose pages are already mapped: a new
        269 MiB array each save (a jitted concatenation's output, or orbax's own copy of a
        host array) made the kernel fault in and zero fresh pages, 0.1-0.5 s of system time
        a save with the main thread waiting (results/bench/NOTES.md, "End to end"). The
        writes read straight from these buffers (page aligned for ``O_DIRECT``; orbax's
        without a copy, ``_registry``), so a save must be finished before they are refilled.
        """
        for dt, (_, leaves) in order.items():
            n = sum(int(x.size) for x in leaves)
            if dt not in self._host or self._host[dt].shape != (n,):
                self._host[dt] = rawio.aligned_empty(n, dt)
        return {dt: self._host[dt] for dt in order}

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    # -- restoring
    def meta(self, step: int) -> dict:
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory}: unreadable meta ({e})"
            ) from e
        return dict(out["meta"])

    def restore(self, step: int, target, *, expect: dict | None = None):
        """Restores ``step`` into the structure of ``target`` and checks its manifest.

        ``expect``: meta fields that must match (e.g. the architecture); a mismatch, a
        missing array, or an array whose hash differs from the manifest is refused, naming
        what is wrong.
        """
        meta = self.meta(step)
        for key, want in (expect or {}).items():
            if meta.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} has {key}={meta.get(key)!r}, "
                    f"expected {want!r}"
                )
        target_tree = serialization.to_state_dict(target)
        _check_structure(meta.get("shapes", {}), target_tree, step)
        # Checkpoints written before manifest_algo was recorded carry sha256 digests.
        algo = meta.get("manifest_algo", "sha256")
        if algo not in hashing.MANIFEST_ALGOS:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory}: unknown manifest checksum {algo!r}"
            )
        if "layout" in meta:
            host = self.arrays(step, meta)
            self._check_manifest(step, meta, host, algo)
            flat, treedef = jax.tree_util.tree_flatten_with_path(target_tree)
            leaves = [_put_like(host[hashing.path_str(p)], x) for p, x in flat]
            tree = jax.tree_util.tree_unflatten(treedef, leaves)
        else:  # one orbax array per leaf (before packing)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
            tree = self._restore_item(
                step,
                "state",
                ocp.args.PyTreeRestore(
                    abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                ),
            )
            self._check_manifest(step, meta, tree, algo)
        return serialization.from_state_dict(target, tree), meta

    def arrays(self, step: int, meta: dict | None = None) -> dict[str, np.ndarray]:
        """Every array of checkpoint ``step`` as numpy, keyed by path; no target needed.

        Reads both layouts; the manifest is not checked here (``restore`` checks it).
        """
        meta = self.meta(step) if meta is None else meta
        layout = meta.get("layout")
        if layout is None:
            item = os.path.join(self.directory, str(step), "state")
            try:
                stored = ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} could not be read: "
                    f"{type(e).__name__}: {str(e)[:300]}"
                ) from e
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
            tree = self._restore_item(step, "state", ocp.args.PyTreeRestore(restore_args=args))
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            return {hashing.path_str(p): np.asarray(x) for p, x in flat}
        if layout.get("format") not in (LAYOUT, ORBAX_PACKED):
            raise CheckpointError(
                f"checkpoint {step} in {self.directory}: unknown layout {layout.get('format')!r}"
                f" (this version reads {LAYOUT!r} and {ORBAX_PACKED!r})"
            )
        order, shapes = layout["order"], meta["shapes"]
        sizes = {dt: sum(_size(shapes[n][0]) for n in names) for dt, names in order.items()}
        if layout["format"] == LAYOUT:
            counts = {dt: (dt, n) for dt, n in sizes.items()}
            packed = self._restore_item(step, "packed", rawio.RawArraysRestore(counts))
        else:
            args = {dt: ocp.RestoreArgs(restore_type=np.ndarray) for dt, n in sizes.items() if n}
            packed = self._restore_item(step, "state", ocp.args.PyTreeRestore(restore_args=args))
            packed.update({dt: np.zeros(0, dt) for dt, n in sizes.items() if not n})
        for dt, n in sizes.items():
            got = packed.get(dt)
            if got is None or got.shape != (n,) or str(got.dtype) != dt:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} is corrupt: packed {dt} array is "
                    f"{None if got is None else (got.shape, str(got.dtype))}, the layout "
                    f"says ({n},)"
                )
        return _unpack_host(packed, order, shapes)

    def _restore_item(self, step: int, name: str, args):
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**{name: args}))
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory}: {e}") from e
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} could not be read: "
                f"{type(e).__name__}: {str(e)[:300]}"
            ) from e
        return out[name]

    def _check_manifest(self, step: int, meta: dict, tree, algo: str) -> None:
        bad = _mismatched(meta["manifest"], hashing.leaf_checksums(tree, algo))
        if bad:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is corrupt: array(s) "
                f"{', '.join(bad[:10])} do not match the manifest; refusing to restore"
            )

    # -- retention
    def retain(
        self,
        keep_last: int,
        keep_every: int = 0,
        protected: Iterable[int] = (),
        *,
        before: Iterable[int] = (),
    ) -> list:
        """Deletes checkpoints no rule keeps; returns the deleted steps.

        Kept: the last ``keep_last``, every multiple of ``keep_every``, the ``protected``
        steps, and for each step of ``before`` (drop-off onsets) the last checkpoint
        strictly before it, the one a replay of that drop-off starts from.
        """
        steps = self.steps()
        keep = set(steps[-keep_last:]) if keep_last else set()
        keep |= {s for s in steps if keep_every and s % keep_every == 0}
        keep |= set(protected) | protected_steps(steps, before)
        deleted = [s for s in steps if s not in keep]
        for s in deleted:
            self._mngr.delete(s)
        return deleted


def protected_steps(steps: Iterable[int], event_steps: Iterable[int]) -> set[int]:
    """For each event step, the last checkpoint step strictly before it."""
    steps = sorted(steps)
    out = set()
    for e in event_steps:
        before = [s for s in steps if s < e]
        if before:
            out.add(before[-1])
    return out


def _order(tree) -> dict[str, tuple[list[str], list]]:
    """dtype -> (paths, leaves) in flatten order: what each packed array holds."""
    out: dict[str, tuple[list[str], list]] = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = jnp.asarray(x)
        names, leaves = out.setdefault(str(x.dtype), ([], []))
        names.append(hashing.path_str(p))
        leaves.append(x)
    return out


def _fill_and_checksum(jobs: list) -> dict[str, str]:
    """Copies each ``(path, destination view, leaf)`` and returns the manifest.

    Runs while training waits for the save, so its threads have the cores to themselves:
    the copies and crc32s release the GIL, and each thread checksums the leaves it has just
    copied. The bytes are the leaves' bytes (``np.asarray`` of a CPU array is a view of its
    buffer; elsewhere, a fetch).
    """

    def part(chunk):
        out = {}
        for path, dst, leaf in chunk:
            dst[...] = np.asarray(leaf)
            out[path] = hashing.crc32(dst)
        return out

    workers = max(1, min(_SAVE_THREADS, machine.cpu_threads(), len(jobs)))
    # contiguous chunks of about equal bytes
    sizes = np.cumsum([dst.nbytes for _, dst, _ in jobs])
    cuts = np.searchsorted(sizes, sizes[-1] * np.arange(1, workers) / workers) if jobs else []
    chunks = [c for c in np.split(np.arange(len(jobs)), cuts) if len(c)]
    with concurrent.futures.ThreadPoolExecutor(len(chunks) or 1) as pool:
        parts = pool.map(part, [[jobs[i] for i in c] for c in chunks])
        manifest = {k: v for p in parts for k, v in p.items()}
    return {path: manifest[path] for path, _, _ in jobs}


def _registry():
    """orbax's standard type handlers, except that host arrays are written uncopied.

    ``Checkpoints._buffers`` are not refilled until the previous save is finished, so
    orbax's defensive deep copy of a host array (another 269 MiB of fresh memory a save)
    is not needed.
    """
    th = ocp.type_handlers
    standard = (int, float, bytes, np.number, jax.Array, str)
    return th.create_type_handler_registry(
        *[(ty, th.get_type_handler(ty)) for ty in standard],
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
    )


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _unpack_host(packed: dict, order: dict, shapes: dict) -> dict[str, np.ndarray]:
    """The leaves of host packed arrays, as views, keyed by path."""
    out = {}
    for dt, names in order.items():
        flat, at = packed[dt], 0
        for n in names:
            shape = tuple(shapes[n][0])
            out[n] = flat[at : at + _size(shape)].reshape(shape)
            at += _size(shape)
    return out


def _put_like(host: np.ndarray, like) -> jax.Array:
    """``host`` on the devices (and with the sharding) of the target leaf ``like``."""
    sharding = getattr(like, "sharding", None)
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _shapes(tree) -> dict[str, list]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        hashing.path_str(p): [
            list(np.shape(x)),
            str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype),
        ]
        for p, x in flat
    }


def _check_structure(stored: dict, target_tree, step: int) -> None:
    want = _shapes(target_tree)
    missing = sorted(set(want) - set(stored))
    extra = sorted(set(stored) - set(want))
    wrong = sorted(k for k in set(want) & set(stored) if want[k] != stored[k])
    if missing or extra or wrong:
        detail = [
            f"missing arrays {missing[:8]}" if missing else "",
            f"unexpected arrays {extra[:8]}" if extra else "",
            "wrong shape/dtype " + ", ".join(f"{k}: {stored[k]} vs {want[k]}" for k in wrong[:8])
            if wrong
            else "",
        ]
        raise CheckpointError(
            f"checkpoint {step} does not fit this model/optimizer ("
            + "; ".join(d for d in detail if d)
            + "): a checkpoint from another architecture or config?"
        )


def _mismatched(manifest: dict, actual: dict) -> list[str]:
    return sorted(k for k in manifest if actual.get(k) != manifest[k])
