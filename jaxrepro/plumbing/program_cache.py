"""Compiled programs kept across processes, keyed by what their trace is a function of.

JAX's persistent cache keys an executable by its lowered program, so even a hit pays for
tracing and lowering it: about 2 s for the ResNet-50 train step on one CPU core, most of
the fixed cost of a diagnosis or a replay. This cache keys an executable by what the trace
is built from instead:

- the program's description (``describe``: the config fields that enter it, its phase);
- the avals, shardings and tree structure of its arguments;
- this package's source, the versions of the libraries that trace it;
- JAX's settings, XLA's and JAX's environment variables, the devices and the CPU.

A hit loads the very executable the first process compiled, without a trace. Every key part
errs towards a miss (a miss costs one compile, a wrong hit would cost the bits): the
config fields left out of a description are the ones shown not to change the lowered
program (tests/test_program_cache.py). The loaded program's argument structure and avals
are checked against the call's before it is used.

The directory is JAX's compilation cache directory with ``-programs`` appended, so that
``JAXREPRO_COMPILE_CACHE_DIR`` (and ``JAXREPRO_COMPILE_CACHE=0``, which disables both)
govern it too. Single-process runs only. Files are written atomically; a file that cannot
be read is a miss, and is overwritten by the next save.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import pickle
import tempfile
import threading
import zlib

import jax

log = logging.getLogger("jaxrepro")
FORMAT = 1
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections")


def directory() -> str | None:
    """Where programs are kept; None when JAX's persistent cache is off."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or os.environ.get("JAXREPRO_PROGRAM_CACHE", "1") == "0":
        return None
    if jax.process_count() > 1:
        return None
    return f"{os.path.abspath(cache).rstrip(os.sep)}-programs"


@functools.cache
def _source_digest() -> str:
    """sha256 of every Python file of the package, by relative path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu() -> str:
    """The first CPU's model and feature flags (XLA:CPU compiles for the host's features)."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n", 1)[0]
    except OSError:
        return ""
    keep = ("vendor_id", "cpu family", "model", "model name", "flags")
    return "\n".join(line for line in block.splitlines() if line.split(":")[0].strip() in keep)


def environment() -> dict:
    """What every program of this process depends on beyond its description and arguments."""
    settings = {
        k: repr(v)
        for k, v in sorted(jax.config.values.items())
        if "cache" not in k  # where caches are, not what is compiled
    }
    client = jax.devices()[0].client
    return {
        "format": FORMAT,
        "source": _source_digest(),
        "versions": _versions(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("XLA_", "JAX_"))},
        "jax_config": settings,
        "backend": [client.platform, client.platform_version],
        "devices": [(d.id, d.device_kind) for d in jax.devices()],
        "process_count": jax.process_count(),
        "cpu": _cpu(),
        "threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def arguments(args) -> dict:
    """The avals, shardings and tree structure of a program's positional arguments."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return {
        "tree": str(tree),
        "leaves": [
            [list(x.shape), str(x.dtype), str(getattr(x, "sharding", None))] for x in leaves
        ],
    }


def key(description: dict, args) -> str:
    """The cache key of the program ``description`` called with ``args``."""
    parts = {"program": description, "args": arguments(args), "environment": environment()}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _path(root: str, k: str) -> str:
    return os.path.join(root, f"{k}.program")


def stored(k: str | None) -> bool:
    """Whether a program is stored under key ``k`` (None: the cache is off)."""
    root = directory()
    return k is not None and root is not None and os.path.exists(_path(root, k))


def load(k: str, args):
    """The program stored under key ``k``, loaded, or None (absent, unreadable, or not made
    for ``args``'s structure and avals)."""
    root = directory()
    if root is None or not os.path.exists(_path(root, k)):
        return None
    from jax.experimental import serialize_executable

    try:
        with open(_path(root, k), "rb") as f:
            stored = pickle.loads(zlib.decompress(f.read()))
        if stored.get("format") != FORMAT:
            return None
        compiled = serialize_executable.deserialize_and_load(
            stored["executable"], stored["in_tree"], stored["out_tree"]
        )
    except Exception as e:  # noqa: BLE001 -- any unreadable entry is a miss
        log.warning("program cache: %s unreadable (%s); compiling", _path(root, k), e)
        return None
    want = jax.tree_util.tree_structure((tuple(args), {}))
    got = [(tuple(a.shape), a.dtype) for a in jax.tree_util.tree_leaves(compiled.args_info)]
    mine = [(tuple(x.shape), x.dtype) for x in jax.tree_util.tree_leaves(args)]
    if compiled.in_tree != want or got != mine:
        log.warning("program cache: %s was made for other arguments; compiling", _path(root, k))
        return None
    return compiled


class Capture:
    """What JAX's persistent cache did in one thread while a program was compiled: how many
    hits it reported (its own monitoring event) and the serialized executables it handed
    out (``raw``)."""

    def __init__(self):
        self.hits = 0
        self.raw: list[bytes] = []

    def stored_bytes(self):
        """(can the program be stored, the bytes to store it with): a fresh compile is
        serialized as it is; a hit only with JAX's bytes of it, and only when exactly one
        hit handed out exactly one executable (anything else: not stored)."""
        if self.hits == 0 and not self.raw:
            return True, None
        if self.hits == 1 and len(self.raw) == 1:
            return True, self.raw[0]
        return False, None


_THREAD = threading.local()
_PATCH_LOCK = threading.Lock()


@functools.cache
def _listen() -> None:
    """Counts JAX's persistent-cache hits per thread (registered once per process)."""

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            capture = getattr(_THREAD, "capture", None)
            if capture is not None:
                capture.hits += 1

    jax.monitoring.register_event_listener(on_event)


@contextlib.contextmanager
def capturing():
    """Yields a ``Capture`` of this thread's persistent-cache hits while in the block. An
    executable loaded from JAX's cache cannot be serialized again on XLA:CPU (its functions
    are not in the result: running the reloaded copy fails), so ``save`` stores the cache's
    own bytes of it instead; the hit count (JAX's monitoring event) guards against storing
    a reloaded executable when its bytes were not seen (``Capture.stored_bytes``).
    """
    from jax._src import compilation_cache as jax_cache

    _listen()
    capture = Capture()
    thread = threading.get_ident()
    real = jax_cache.decompress_executable

    def decompress(blob):
        out = real(blob)
        if threading.get_ident() == thread:
            capture.raw.append(jax_cache.extract_executable_and_time(out)[0])
        return out

    with _PATCH_LOCK:
        jax_cache.decompress_executable = decompress
    outer, _THREAD.capture = getattr(_THREAD, "capture", None), capture
    try:
        yield capture
    finally:
        _THREAD.capture = outer
        with _PATCH_LOCK:
            if jax_cache.decompress_executable is decompress:
                jax_cache.decompress_executable = real


def _serialized(compiled, raw: bytes | None) -> bytes:
    """``jax.experimental.serialize_executable.serialize``'s pickle, with the executable's
    bytes taken from ``raw`` (JAX's persistent cache's) where given."""
    from jax._src.lib import xla_client
    from jax.experimental import serialize_executable

    class Pickler(serialize_executable._JaxPjrtPickler):
        def persistent_id(self, obj):
            if raw is not None and isinstance(obj, xla_client.LoadedExecutable):
                return ("exec", raw)
            return super().persistent_id(obj)

    unloaded = getattr(compiled._executable, "_unloaded_executable", None)
    if unloaded is None:
        raise ValueError("this program does not support serialization")
    args_info_flat, _ = jax.tree_util.tree_flatten(compiled.args_info)
    with io.BytesIO() as f:
        Pickler(f).dump((unloaded, args_info_flat, compiled._no_kwargs))
        return f.getvalue()


def save(k: str, compiled, description: dict, capture: Capture) -> bool:
    """Stores ``compiled`` under key ``k`` (atomically); False when it cannot be stored.
    ``capture``: what JAX's persistent cache did while it was compiled (``capturing``)."""
    root = directory()
    ok, raw = capture.stored_bytes()
    if root is None or not ok:
        return False
    try:
        blob = zlib.compress(
            pickle.dumps(
                {
                    "format": FORMAT,
                    "executable": _serialized(compiled, raw),
                    "in_tree": compiled.in_tree,
                    "out_tree": compiled.out_tree,
                    "description": description,
                }
            ),
            1,
        )
        os.makedirs(root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, _path(root, k))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception as e:  # noqa: BLE001 -- a program that cannot be kept is compiled again
        log.info("program cache: not stored (%s)", e)
        return False
    return True
