"""environment.yml (conda) names the same environment as the Makefile's .venv: the same Python,
the same pip installs (torch's pin, the constraints file, the project with the same extras) and
nothing else, so the package set that pyproject.toml expands them to is the same."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def pip_args(args: list[str]) -> dict:
    """What a list of pip install arguments (or requirement-file lines) names."""
    named = {"packages": {}, "constraints": [], "editable": []}
    args = [a for a in args if a not in ("--quiet", "-q", "--upgrade", "-U")]
    while args:
        arg = args.pop(0)
        if arg in ("-c", "--constraint"):
            named["constraints"].append(args.pop(0))
        elif arg in ("-e", "--editable"):
            path, _, extras = args.pop(0).partition("[")
            named["editable"].append((path, sorted(e.strip() for e in extras.rstrip("]").split(",") if e.strip())))
        else:
            assert not arg.startswith("-"), f"unexpected pip option {arg}"
            req = Requirement(arg)
            named["packages"][canonicalize_name(req.name)] = str(req.specifier)
    return named


def from_makefile() -> tuple[str, dict]:
    makefile = (ROOT / "Makefile").read_text()
    python = re.search(r"^PYTHON \?= .*?command -v python(\d+\.\d+)", makefile, re.M).group(1)
    args = [a for line in re.findall(r"-m pip install (.*)", makefile) for a in shlex.split(line)]
    return python, pip_args(args)


def from_environment_yml() -> tuple[str, dict]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip_lines = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines += [a for line in dep.pop("pip") for a in shlex.split(line)]
            assert not dep, f"environment.yml: unexpected section {dep}"
        else:
            conda.append(dep)
    named = pip_args(pip_lines)
    python = None
    for dep in conda:  # conda specs: name=version
        name, _, version = dep.partition("=")
        if name == "python":
            python = version
        else:
            assert not version, f"environment.yml: conda pins {dep}; the Makefile installs everything with pip"
            named["packages"][canonicalize_name(name)] = ""
    return python, named


def package_set(named: dict) -> set[str]:
    """Every distribution the install names: its own requirements plus the project's, with its extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set(named["packages"])
    for path, extras in named["editable"]:
        assert path == ".", path
        unknown = set(extras) - set(project["optional-dependencies"])
        assert not unknown, f"extras {unknown} are not in pyproject.toml"
        reqs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
        names |= {canonicalize_name(Requirement(r).name) for r in reqs}
    return names


def test_environment_yml_names_the_makefiles_environment():
    make_python, make = from_makefile()
    conda_python, conda = from_environment_yml()
    assert conda_python == make_python == "3.11"
    # The Makefile upgrades pip inside the venv; conda installs it: both name pip and torch's pin.
    assert conda["packages"] == make["packages"]
    assert make["packages"]["torch"] == "==2.13.0"
    assert conda["constraints"] == make["constraints"] == ["constraints.txt"]
    assert conda["editable"] == make["editable"]
    assert package_set(conda) == package_set(make)
    assert {"jupyterlab", "jupyterlab-widgets", "ipykernel", "ipywidgets"} <= package_set(make)
