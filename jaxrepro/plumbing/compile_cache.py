"""JAX's persistent compilation cache, as every jaxrepro process sets it up."""

from __future__ import annotations

import os


def setup() -> None:
    """JAX's persistent compilation cache: a second run of a config compiles nothing."""
    if os.environ.get("JAXREPRO_COMPILE_CACHE", "1") == "0":
        return
    import jax

    cache = os.environ.get(
        "JAXREPRO_COMPILE_CACHE_DIR", os.path.expanduser("~/.cache/jaxrepro/xla")
    )
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
