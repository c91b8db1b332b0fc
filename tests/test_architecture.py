"""The arrows between the packages, checked on the source (docs/architecture.md).

import-linter (scripts/lint) checks the layers; these allow-lists catch what a deny-list
misses when a module is added: outside kvstate nothing imports a private ``kvstate._*``
module, and the dashboard reads the archive through ``archiver.read`` and ``archiver.errors``
only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_KVSTATE = ("archiver", "dashboard", "demo", "devstack", "bench", "robustness")


def imports(package: str) -> Iterator[tuple[Path, int, str]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.lineno, node.module
                for alias in node.names:
                    yield path, node.lineno, f"{node.module}.{alias.name}"


@pytest.mark.parametrize("package", OUTSIDE_KVSTATE)
def test_nothing_outside_kvstate_imports_its_private_modules(package: str) -> None:
    private = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for path, line, name in imports(package)
        if name.startswith("kvstate.") and any(part.startswith("_") for part in name.split(".")[1:2])
    ]
    assert not private, "use kvstate's public API instead:\n" + "\n".join(private)


def test_the_dashboard_reads_the_archive_only_through_its_read_api() -> None:
    allowed = ("archiver.read", "archiver.errors")
    wrong = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for path, line, name in imports("dashboard")
        if name.startswith("archiver.") and not name.startswith(allowed)  # "from archiver import read": archiver.read
    ]
    assert not wrong, "\n".join(wrong)


def test_kvstate_imports_none_of_the_packages_built_on_it() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for path, line, name in imports("kvstate")
        if name.split(".")[0] in OUTSIDE_KVSTATE
    ]
    assert not wrong, "\n".join(wrong)
