"""Shared test setup: CPU only, absl flags parsed, small shared data dir."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's multiprocessing and absl-using code need parsed flags under pytest.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir shared by the session, where embedded datasets get built."""
    return str(tmp_path_factory.mktemp("tfds"))
