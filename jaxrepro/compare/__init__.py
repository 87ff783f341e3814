"""Comparison against PyTorch (the ``torch`` extra).

* ``torch_resnet``: a torchvision-compatible ResNet (torchvision itself cannot be imported
  beside the pinned torch wheel);
* ``torch_port``: weights both ways between torchvision-format state_dicts and Flax;
* ``readers``: PyTorch results (Lightning CSV, JSONL, TensorBoard) as jaxrepro rows;
* ``reference``: the PyTorch reference trainer (``jaxrepro torch_train``): the same run
  as the JAX engine, on the engine's batches, from the engine's initial weights;
* ``report``: ``jaxrepro compare``: curves, per-step divergence, final-metric statistics.

Submodules are imported explicitly; importing this package imports neither torch nor jax.
"""
