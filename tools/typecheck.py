"""Type-check the package as it is installed, not as the folders happen to be laid out.

pyproject maps ``runtime/`` to ``embedrt``, ``export/`` to ``embedrt.export`` and ``models/`` to
``embedrt.models``; the editable install does it with an import hook that mypy cannot follow, so
``mypy runtime`` resolved every ``from embedrt...`` import to ``Any`` and a type error across modules
passed. This script rebuilds ``build/typecheck/embedrt/`` as links to the real files on every run (so
a new module or subpackage is checked without touching this script), runs mypy on it, and prints its
report with the paths mapped back to the source tree. Exit status: mypy's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: mypy itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TREE = REPO / "build" / "typecheck"


def package_dirs() -> dict[str, Path]:
    """Import name -> source folder, read from pyproject's package-dir mapping (the one source of truth)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


def build_tree(packages: dict[str, Path]) -> Path:
    """A fresh tree of symlinks laid out as the installed package; returns the top package's folder."""
    shutil.rmtree(TREE, ignore_errors=True)
    for name in sorted(packages, key=lambda n: n.count(".")):  # parents before the subpackages inside them
        dest = TREE.joinpath(*name.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for item in sorted(packages[name].iterdir()):
            if item.name == "__pycache__" or item.name.startswith("."):
                continue
            if (item.is_dir() and (item / "__init__.py").is_file()) or item.suffix in (".py", ".pyi") \
                    or item.name == "py.typed":
                (dest / item.name).symlink_to(item)
    top = min(packages, key=lambda n: n.count("."))
    return TREE / top


def map_back(line: str, packages: dict[str, Path]) -> str:
    """Rewrite ``build/typecheck/embedrt/export/x.py`` as ``export/x.py`` (the longest package first)."""
    for name in sorted(packages, key=lambda n: -n.count(".")):
        linked = (TREE.joinpath(*name.split("."))).relative_to(REPO).as_posix() + "/"
        source = packages[name].relative_to(REPO).as_posix() + "/"
        line = re.sub(rf"(?<![\w/]){re.escape(linked)}", source, line)
    return line


def main(argv: list[str]) -> int:
    packages = package_dirs()
    top = build_tree(packages)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), *argv,
           top.relative_to(REPO).as_posix()]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "MYPYPATH": str(TREE)})
    for line in (done.stdout + done.stderr).splitlines():
        print(map_back(line, packages))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
