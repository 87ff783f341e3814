"""jaxrepro: deterministic seed studies of deep-network training in JAX/Flax."""

__version__ = "0.1.0"
