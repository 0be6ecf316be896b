"""The floors of the code, read from every source module's imports (lazy ones inside functions included):

    zerowire/ -> coordinator/, worker/ -> communication/ -> protos/;  jobspec is imported by both sides

- jobspec imports no package of the project;
- the coordinator never imports worker/ or communication/ (it never touches tensors);
- communication/ never imports worker/, coordinator/ or jobspec;
- worker/ never imports coordinator/ or the front (zerowire/);
- the engine (worker/zero3/) takes from communication/ only the contract (backend, group, errors) and from
  worker/ nothing but itself: the model's units come through a hook, not the model zoo.

A new arrow against these fails here, naming the module and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("jobspec", "coordinator", "worker", "communication", "protos", "zerowire")
CONTRACT = {"communication.backend", "communication.group", "communication.errors"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> list[tuple[str, str]]:
    """(importer, imported module) for every import of a project package in the source tree under ROOT.
    ``from a import b`` is an arrow to ``a.b`` where that is a module, else to ``a``."""
    known = {module_name(root, p) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    edges: list[tuple[str, str]] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(root, path)
            here = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    base = here[: len(here) - node.level + 1] if node.level else []
                    target = ".".join([*base, node.module] if node.module else base)
                    names = [
                        f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names
                    ]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                edges.extend((importer, name) for name in names if name.split(".")[0] in PACKAGES)
    return sorted(set(edges))


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def violations(edges: list[tuple[str, str]]) -> list[str]:
    """Every import that breaks a floor, with the rule it breaks."""
    out = []
    for importer, imported in edges:
        top = imported.split(".")[0]
        rule = None
        if _under(importer, "jobspec") and top != "jobspec":
            rule = "jobspec imports no package of the project"
        elif _under(importer, "coordinator") and top in {"worker", "communication", "zerowire"}:
            rule = "the coordinator imports neither worker/ nor communication/"
        elif _under(importer, "communication") and top in {"worker", "coordinator", "zerowire", "jobspec"}:
            rule = "communication/ imports only itself and protos/"
        elif _under(importer, "protos") and top != "protos":
            rule = "protos/ imports only itself"
        elif _under(importer, "worker") and top in {"coordinator", "zerowire"}:
            rule = "worker/ imports neither the coordinator nor the front"
        if _under(importer, "worker.zero3"):
            if top == "communication" and imported not in CONTRACT and imported != "communication":
                rule = "the engine takes only the contract (backend, group, errors) from communication/"
            elif top == "worker" and not _under(imported, "worker.zero3"):
                rule = "the engine imports nothing of worker/ outside worker/zero3/"
        if rule:
            out.append(f"{importer} imports {imported}: {rule}")
    return sorted(set(out))


def test_the_floors_hold() -> None:
    assert violations(imports(REPO)) == []


def test_the_scan_sees_real_arrows() -> None:
    # The scan is not vacuous: it finds the arrows that are allowed, lazy ones inside functions included.
    edges = imports(REPO)
    assert ("coordinator.settings", "jobspec") in edges
    assert ("worker.zero3.sharded", "communication.backend") in edges
    assert ("zerowire.commands.run", "zerowire.localcluster") in edges
    assert any(a.startswith("zerowire.") and b.startswith("coordinator.") for a, b in edges)


@pytest.mark.parametrize(
    ("path", "source", "rule"),
    [
        ("coordinator/app.py", "from worker.trainer import Trainer\n", "the coordinator imports neither"),
        ("communication/lane.py", "def f():\n    import worker.manager\n", "communication/ imports only"),
        ("worker/zero3/plan.py", "from communication.tensor_stream import all_finite\n", "only the contract"),
        ("worker/zero3/plan.py", "from worker.models import ResNet\n", "nothing of worker/ outside"),
        ("worker/zero3/plan.py", "from ..models import ResNet\n", "nothing of worker/ outside"),
        ("jobspec/__init__.py", "from coordinator import settings\n", "jobspec imports no package"),
        ("worker/daemon.py", "from zerowire import cli\n", "neither the coordinator nor the front"),
    ],
)
def test_a_new_arrow_against_a_floor_fails(tmp_path: Path, path: str, source: str, rule: str) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    for sub in ("worker/zero3", "worker/models", "communication", "coordinator"):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "__init__.py").write_text("")
    for module in (
        "worker/trainer.py",
        "worker/manager.py",
        "communication/tensor_stream.py",
        "zerowire/cli.py",
    ):
        (tmp_path / module).write_text("")
    (tmp_path / path).write_text(source)
    found = violations(imports(tmp_path))
    assert len(found) == 1 and rule in found[0], found
