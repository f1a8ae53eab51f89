"""omni-jax benchmarks (run as ``python -m bench ...``)."""
