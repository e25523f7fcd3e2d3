"""Fail when an installed distribution differs from its pin in a constraints file.

pip's `-c` keeps a resolve from moving a pinned package, but a pin can still drift (an earlier install,
a later `pip install` by hand); this compares what is installed now with every `name==version` line.
Runs on the interpreter being checked, with the standard library only (Python 3.9+).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """name -> pinned version for each `name==version` line (comments and other lines skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.split("#", 1)[0])
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    return pins


def drifted(pins: dict[str, str]) -> list[str]:
    """One line per pinned distribution that is missing or installed at another version."""
    installed = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken install can leave a dist-info without a name
            installed[_canonical(name)] = dist.version
    problems = []
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: pinned {version}, not installed")
        elif have.split("+", 1)[0] != version.split("+", 1)[0]:
            problems.append(f"{name}: pinned {version}, installed {have}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_pins.py CONSTRAINTS_FILE", file=sys.stderr)
        return 2
    path = Path(argv[0])
    pins = read_pins(path)
    problems = drifted(pins)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{path}: all {len(pins)} pins installed exactly")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
