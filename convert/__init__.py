"""Checkpoint conversion: Hugging Face safetensors -> the omni-jax orbax format (``convert.py``) and
back (``export.py``), with the component registry as conversion uses it (``components.py``), atomic
output directories (``atomic.py``) and the ``omni-jax convert`` / ``export`` subcommands (``cli.py``).

The file formats and the loaders are the library's (:mod:`omni_jax.checkpoint`). Installed, this
package is ``omni_jax.convert``; in a source checkout it is also importable as ``convert``.
"""
