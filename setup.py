"""The package layout, which pyproject.toml (the rest of the metadata) cannot express.

The repository's folders stay as they are (``omni_jax/`` the library, ``convert/`` and ``train/`` its
tools), but only the library's namespace is installed: ``convert/`` becomes ``omni_jax.convert`` and
``train/`` ``omni_jax.train``, so nothing generic such as ``convert`` or ``train`` lands at the top of
site-packages. Every package is found, so a new subpackage is never left out of the wheel.
"""

from setuptools import find_packages, setup

TOOLS = {"omni_jax.convert": "convert", "omni_jax.train": "train"}

packages = find_packages(include=["omni_jax", "omni_jax.*"])
for name, folder in TOOLS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

# the browser page of `omni-jax serve` (GET /realtime) is a file of the serve package
setup(packages=packages, package_dir=dict(TOOLS), package_data={"omni_jax.serve": ["static/*.html"]})
