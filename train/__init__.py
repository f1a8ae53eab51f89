"""Fine-tuning omni-jax models: ``omni-jax train`` / ``python -m train`` (see train/cli.py)."""
