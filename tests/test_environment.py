"""The pinned test environment covers what the project asks for.

``constraints.txt`` holds the versions the suite was verified with; the README's test command and
``.ci/run`` install through it. A dependency added to ``pyproject.toml`` without a pin there would be
taken at its newest release, so the README's commands would stop giving the same result next month."""

from __future__ import annotations

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, sep, version = line.partition("==")
                assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
                pins[_norm(name)] = version
    return pins


def test_every_dependency_is_pinned():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = list(project["dependencies"]) + [d for ds in project["optional-dependencies"].values() for d in ds]
    pins = _pins()
    names = {_norm(re.match(r"[A-Za-z0-9_.\-]+", d).group(0)) for d in wanted}
    assert names, "pyproject.toml lists no dependencies"
    missing = sorted(n for n in names if n not in pins)
    assert not missing, f"constraints.txt pins no version of {missing}"


def test_ci_and_readme_install_through_the_constraints():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    command = re.search(r"^pip install -c constraints\.txt .*pytest.*$", ci, re.M)
    assert command, ".ci/run does not install through constraints.txt"
    assert command.group(0) in readme, ".ci/run's test command is not the README's"
