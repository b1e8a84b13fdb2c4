"""The packages' layering (design.md, style.md): model imports neither dicom_node nor training,
dicom_node never imports training, and only the top-level `cli` imports both. Each package is
imported, every module of it, in a fresh interpreter, and what that loaded is checked."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LOADS = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def top_level_packages_loaded_by(package: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", LOADS, package], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.parametrize("package, never", [
    ("model", {"dicom_node", "training", "cli"}),
    ("dicom_node", {"training", "cli"}),
    ("training", {"cli"}),
])
def test_a_package_never_loads_the_packages_above_it(package, never):
    loaded = top_level_packages_loaded_by(package)
    assert package in loaded
    assert not loaded & never, f"importing {package} loaded {sorted(loaded & never)}"


def test_the_cli_loads_both_sides():
    assert {"dicom_node", "training"} <= top_level_packages_loaded_by("cli")


def imported_modules(path: Path) -> set[str]:
    """Every module a file names in an import statement, anywhere in it (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_training_loop_does_not_import_the_commands_that_call_it():
    assert "training.commands" not in imported_modules(REPO / "training" / "loop.py")


def test_benchmarks_do_not_import_the_tests():
    offenders = {path.name: sorted(m for m in imported_modules(path) if m == "tests" or m.startswith("tests."))
                 for path in (REPO / "benchmarks").glob("*.py")}
    assert not {name: mods for name, mods in offenders.items() if mods}
