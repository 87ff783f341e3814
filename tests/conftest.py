"""Shared test setup: CPU only, absl flags parsed, small shared data dir."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of small programs and runs few steps of each: LLVM's
# optimisation level 0 compiles them in less than half the CPU time. The bits of a test's
# runs are compared with each other, all under this one setting (child processes inherit
# it); the test of the production settings' pinned bits (tests/test_pinned.py) starts its
# processes without it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Many tests train the same tiny programs: let them share compiled executables, also
# across pytest-xdist's worker processes (they inherit the directory from the controller).
_CACHE = os.environ.setdefault("JAXREPRO_TEST_XLA_CACHE", tempfile.mkdtemp(prefix="jaxrepro-xla-"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
# ... and with the jaxrepro processes the tests start (jaxrepro/plumbing/compile_cache.py),
# unless a test gives them their own: nothing is read from or left in ~/.cache, so the
# suite's time is that of a fresh machine.
os.environ.setdefault("JAXREPRO_COMPILE_CACHE_DIR", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# The program cache (jaxrepro/plumbing/program_cache.py) keys a program by the package's
# files, not by what a test monkeypatches into a traced function (a poisoned augmentation,
# a planted gradient): off in the suite, and in the processes it starts, except where a
# test turns it on (tests/test_program_cache.py, tests/test_diagnose.py).
os.environ["JAXREPRO_PROGRAM_CACHE"] = "0"

# grain's multiprocessing and absl-using code need parsed flags under pytest.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir shared by the session, where embedded datasets get built."""
    return str(tmp_path_factory.mktemp("tfds"))
