"""Checkpoint IO: file formats (safetensors, orbax, the restricted torch pickle), the generic
Hugging Face key mapping, and the one loader that builds every component.

The submodules are imported explicitly (``from omni_jax.checkpoint.tree import flatten_dict``);
this package module imports nothing so that importing one format does not pull in the others.
"""
