"""Print pip constraints that hold every floor in pyproject.toml at its lowest allowed release.

    python3 scripts/lowest-constraints.py > lowest.txt
    pip install -c lowest.txt "torch==2.13.0" -e ".[all]"

Covers `dependencies` and the extras a user installs (`all` less `dev`: the tools stay at their newest, so
that ruff and pytest judge the same code the same way in both CI modes). Each `name>=X` becomes `name==X`;
exact pins are pyproject's own business; pip resolves everything else (what the floors pull in) as usual. torch is
left out: the CPU wheel the install command pins is the one on disk here. `.ci/run --lowest` uses it.
Needs Python 3.11+ (tomllib).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

LEFT_OUT = {"torch"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*(?:;.*)?$")


def floors(requirements: list[str]) -> dict[str, str]:
    """``name -> lowest allowed version`` for each requirement with a ``>=`` (or ``~=``) bound."""
    found: dict[str, str] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"Cannot read the requirement {requirement!r}.")
        name, spec = match.group(1).lower().replace("_", "-"), match.group(2)
        for clause in filter(None, (part.strip() for part in spec.split(","))):
            operator, version = re.match(r"(>=|==|<=|<|>|!=|~=)\s*(.+)", clause).groups()
            if operator in (">=", "~="):
                found[name] = version
    return found


def main() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = list(project["dependencies"])
    for extra in extras:
        if extra not in ("dev", "all"):
            wanted += extras[extra]
    wanted = [r for r in wanted if not r.startswith(f"{project['name']}[")]
    for name, version in sorted(floors(wanted).items()):
        if name not in LEFT_OUT:
            sys.stdout.write(f"{name}=={version}\n")


if __name__ == "__main__":
    main()
