"""requirements/dev.lock is complete and consistent, and the environment the tests run in is the locked one.

scripts/setup.sh installs torch and `.[dev]` with the lock as constraints; these tests fail when the lock no
longer covers what pyproject.toml asks for, or when the environment drifted from it (refresh the lock with
scripts/lock.sh, or re-run scripts/setup.sh)."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]
LOCK = REPO / "requirements" / "dev.lock"
# Installed by the environment's tools rather than required by a package.
TOOLING = {"pip", "setuptools", "wheel"}
# A CUDA build of torch pins these itself, at versions that depend on the build.
TORCH_COMPANIONS = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"dev.lock:{number}: {line!r} is not an exact pin NAME==VERSION"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"dev.lock:{number}: {name} is pinned twice"
        pins[name] = match.group(2)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def requirement_closure(root: str, extras: set[str]) -> set[str]:
    """Every installed distribution that ROOT[EXTRAS] needs, transitively, by the installed metadata."""
    seen: set[str] = set()
    todo = [(canonicalize_name(root), frozenset(extras))]
    visited: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in visited:
            continue
        visited.add((name, wanted))
        seen.add(name)
        for text in md.requires(name) or []:
            req = Requirement(text)
            contexts = [{"extra": e} for e in wanted | {""}]
            if req.marker is None or any(req.marker.evaluate(c) for c in contexts):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return seen


def test_lock_pins_every_requirement_of_pyproject_within_its_range() -> None:
    pins = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in the lock: run scripts/lock.sh"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"dev.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}: run scripts/lock.sh"
        )


def test_environment_is_the_locked_one() -> None:
    pins = locked()
    needed = requirement_closure("zerowire", {"dev"}) - {"zerowire"}
    problems = []
    for name in sorted(needed):
        if TORCH_COMPANIONS.match(name):
            continue
        if name not in pins:
            problems.append(f"{name} is needed but not locked")
            continue
        have = md.version(name)
        # torch's build is a local version label (2.13.0+cpu): the lock pins the release.
        if Version(have).public != Version(pins[name]).public:
            problems.append(f"{name} {have} is installed, the lock says {pins[name]}")
    stale = sorted(set(pins) - needed - TOOLING)
    assert not stale, f"locked but needed by nothing: {stale}: run scripts/lock.sh"
    assert not problems, "; ".join(problems) + " (run scripts/setup.sh, or scripts/lock.sh to refresh)"


def test_locked_environment_is_consistent() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_requirement_closure_follows_extras_and_markers() -> None:
    # pytest needs pluggy in every environment; zerowire's dev extra brings pytest, the bare package does not.
    assert "pluggy" in requirement_closure("pytest", set())
    assert "pytest" in requirement_closure("zerowire", {"dev"})
    assert "pytest" not in requirement_closure("zerowire", set())
