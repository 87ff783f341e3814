"""Data: sources (TFDS, incl. the embedded offline datasets), order, augmentation.

``load(name, split)`` opens a split for random access; ``order.batch_ids`` says
which examples each step reads; ``augment.augment_batch`` augments them on device.
"""

from jaxrepro.data import augment, order
from jaxrepro.data.augment import (
    augment_batch,
    channel_stats,
    default_augment_config,
    eval_preprocess,
)
from jaxrepro.data.embedded import EMBEDDED
from jaxrepro.data.order import batch_ids, num_steps, steps_per_epoch
from jaxrepro.data.sources import (
    CorruptRecordError,
    DatasetNotPreparedError,
    Source,
    UnknownDatasetError,
    check_name,
    decoder_version,
    ensure_prepared,
    load,
    prepare,
    resolve_data_dir,
)

__all__ = [
    "EMBEDDED",
    "CorruptRecordError",
    "DatasetNotPreparedError",
    "Source",
    "UnknownDatasetError",
    "augment",
    "augment_batch",
    "batch_ids",
    "channel_stats",
    "check_name",
    "decoder_version",
    "default_augment_config",
    "ensure_prepared",
    "eval_preprocess",
    "load",
    "num_steps",
    "order",
    "prepare",
    "resolve_data_dir",
    "steps_per_epoch",
]
