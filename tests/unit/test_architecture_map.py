"""docs/architecture.md maps every source module of the project, and names none that is gone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("jobspec", "coordinator", "worker", "communication", "protos", "zerowire")


def source_modules() -> set[str]:
    return {
        p.relative_to(REPO).as_posix()
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if not (p.name == "__init__.py" and not p.read_text().strip())  # empty package markers
    }


def mapped_modules() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    pattern = r"`((?:" + "|".join(PACKAGES) + r")/[\w/]+\.py)`"
    return set(re.findall(pattern, text))


def test_every_source_module_is_on_the_map() -> None:
    missing = sorted(source_modules() - mapped_modules())
    assert not missing, f"docs/architecture.md does not map: {missing}"


def test_the_map_names_no_module_that_is_gone() -> None:
    gone = sorted(m for m in mapped_modules() if not (REPO / m).exists())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


def test_the_map_is_read_from_the_text() -> None:
    mapped = mapped_modules()
    assert {"worker/daemon.py", "communication/backend.py", "jobspec/__init__.py"} <= mapped
    assert len(mapped) >= 100
