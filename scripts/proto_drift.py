"""Drift check of the generated protobuf package: does protos/ still say what protos/*.proto say?

    python scripts/proto_drift.py ROOT           (ROOT holds protos/; exit 1 on drift)
    python scripts/proto_drift.py --write ROOT   (regenerate ROOT/protos/ in place)

The files in protos/ are regenerated into a scratch folder with the installed grpcio-tools and compared with
the committed ones, file by file:

- With the version lines normalised (grpcio-tools writes its own version and the protobuf version it
  targets into the files), the texts must be equal when the committed files came from the same
  grpcio-tools version as the installed one: the generator is deterministic, so a difference is a stale or
  hand-edited file.
- Under another grpcio-tools version the layout of the generated code may change, so what is compared is
  what the code means: the file descriptor embedded in `*_pb2.py` (every message, field, enum and service),
  the RPC table of `*_pb2_grpc.py` (method paths, streaming kinds, request and response types) and the
  classes and fields declared by `*_pb2.pyi`.

A newer or older grpcio-tools therefore passes while any change to a message or a service fails.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from google.protobuf import descriptor_pb2, text_format

_VERSION_LINES = (
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '<version>'"),
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <version>"),
    (
        # ValidateProtobufRuntimeVersion(Domain.PUBLIC, MAJOR, MINOR, PATCH, 'SUFFIX', 'file.proto')
        re.compile(r"(_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"),
        r"\1 <version>,",
    ),
)

_GRPC_CALLS = {"unary_unary", "unary_stream", "stream_unary", "stream_stream"}


def normalise(text: str) -> str:
    """The generated text with the generator's and the targeted runtime's versions blanked out."""
    for pattern, replacement in _VERSION_LINES:
        text = pattern.sub(replacement, text)
    return text


def generator_version(grpc_module: str) -> str | None:
    """The grpcio-tools version that wrote a `*_pb2_grpc.py` text (its GRPC_GENERATED_VERSION)."""
    found = re.search(r"^GRPC_GENERATED_VERSION = '([^']*)'$", grpc_module, re.M)
    return found.group(1) if found else None


def descriptor(pb2_module: str) -> descriptor_pb2.FileDescriptorProto:
    """The serialized FileDescriptorProto a `*_pb2.py` text embeds, read without importing it (the
    import would check the protobuf runtime's version against the generator's)."""
    for node in ast.walk(ast.parse(pb2_module)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value)
    raise ValueError("no AddSerializedFile(b'...') call: not a generated _pb2.py")


def _dotted(node: ast.AST | None) -> str:
    return ast.unparse(node) if node is not None else ""


def rpc_table(grpc_module: str) -> list[tuple[str, ...]]:
    """Every client-side and server-side RPC a `*_pb2_grpc.py` text declares, with its streaming kind and
    its (de)serializers, sorted."""
    rows: set[tuple[str, ...]] = set()
    for node in ast.walk(ast.parse(grpc_module)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        kw = {k.arg: _dotted(k.value) for k in node.keywords if k.arg}
        name = node.func.attr
        first = node.args[0] if node.args else None
        if name in _GRPC_CALLS and isinstance(first, ast.Constant) and isinstance(first.value, str):
            # channel.unary_stream('/pkg.Service/Method', request_serializer=..., response_deserializer=...)
            # and the experimental API's grpc.experimental.unary_stream(request, target, '/pkg...', ...).
            rows.add(
                (
                    "client",
                    name,
                    first.value,
                    kw.get("request_serializer", ""),
                    kw.get("response_deserializer", ""),
                )
            )
        elif name in _GRPC_CALLS and len(node.args) >= 3:
            path = node.args[2]
            if isinstance(path, ast.Constant) and isinstance(path.value, str):
                rows.add(
                    ("experimental", name, path.value, _dotted(node.args[3] if len(node.args) > 3 else None))
                )
        elif name.endswith("_rpc_method_handler"):
            rows.add(
                (
                    "server",
                    name,
                    _dotted(first),
                    kw.get("request_deserializer", ""),
                    kw.get("response_serializer", ""),
                )
            )
        elif name == "method_handlers_generic_handler" and isinstance(first, ast.Constant):
            rows.add(("service", str(first.value)))
    return sorted(rows)


def stub_declarations(pyi: str) -> list[tuple[str, tuple[str, ...]]]:
    """Every class a `*_pb2.pyi` text declares (nested ones by dotted name) with the names it declares."""
    out: list[tuple[str, tuple[str, ...]]] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                name = prefix + node.name
                members: set[str] = set()
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        members.update(t.id for t in item.targets if isinstance(t, ast.Name))
                    elif isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        members.update(
                            f"__init__({a.arg})" for a in item.args.kwonlyargs + item.args.args[1:]
                        )
                    elif isinstance(item, ast.ClassDef):
                        members.add(item.name)
                members.discard("__slots__")
                out.append((name, tuple(sorted(members))))
                visit(node.body, name + ".")

    visit(ast.parse(pyi).body, "")
    return sorted(out)


def _meaning(name: str) -> Callable[[str], object] | None:
    if name.endswith("_pb2.py"):
        return descriptor
    if name.endswith("_pb2_grpc.py"):
        return rpc_table
    if name.endswith("_pb2.pyi"):
        return stub_declarations
    return None


def _describe(name: str, committed: object, fresh: object) -> str:
    if isinstance(committed, descriptor_pb2.FileDescriptorProto) and isinstance(
        fresh, descriptor_pb2.FileDescriptorProto
    ):
        old = set(text_format.MessageToString(committed).splitlines())
        new = set(text_format.MessageToString(fresh).splitlines())
        changed = sorted(new - old)[:3] or sorted(old - new)[:3]
        return f"protos/{name}: its messages or services differ from the .proto files (e.g. {changed})"
    if isinstance(committed, list) and isinstance(fresh, list):
        stale = sorted(set(map(str, committed)) - set(map(str, fresh)))[:3]
        missing = sorted(set(map(str, fresh)) - set(map(str, committed)))[:3]
        if name.endswith(".pyi"):  # (class, members): name the members that differ
            old, new = dict(committed), dict(fresh)
            stale = [f"{c}.{m}" for c in old for m in old[c] if m not in new.get(c, ())][:3]
            missing = [f"{c}.{m}" for c in new for m in new[c] if m not in old.get(c, ())][:3]
        return (
            f"protos/{name}: declarations differ from the .proto files (stale: {stale}; missing: {missing})"
        )
    return f"protos/{name}: differs from the .proto files"


def compare(committed_dir: Path, fresh_dir: Path, installed: str) -> tuple[list[str], list[str]]:
    """(problems, notes) of the committed generated files against ones freshly generated by grpcio-tools
    version INSTALLED."""
    problems: list[str] = []
    notes: list[str] = []
    fresh_files = {p.name: p for p in fresh_dir.iterdir() if p.is_file()}
    committed_files = {p.name for p in committed_dir.glob("*_pb2*.py*")}
    for name in sorted(committed_files - set(fresh_files)):
        problems.append(f"protos/{name} is generated from no .proto file: remove it")
    for name, path in sorted(fresh_files.items()):
        target = committed_dir / name
        if not target.exists():
            problems.append(f"protos/{name} is missing: run scripts/gen_protos.sh")
            continue
        old, new = target.read_text(), path.read_text()
        if normalise(old) == normalise(new):
            continue
        grpc_old = committed_dir / name.replace("_pb2.pyi", "_pb2_grpc.py").replace("_pb2.py", "_pb2_grpc.py")
        made_by = (generator_version(grpc_old.read_text()) if grpc_old.exists() else None) or "unknown"
        meaning = _meaning(name)
        if made_by == installed or meaning is None:
            problems.append(f"protos/{name} is out of date with the .proto files (or was edited by hand)")
            continue
        try:
            same = meaning(old) == meaning(new)
        except (SyntaxError, ValueError) as exc:
            problems.append(f"protos/{name} cannot be read as generated code: {exc}")
            continue
        if same:
            notes.append(
                f"protos/{name}: generated by grpcio-tools {made_by}, installed {installed}: "
                "the layout differs, the messages and services are the same"
            )
        else:
            problems.append(_describe(name, meaning(old), meaning(new)))
    return problems, notes


def generate(root: Path, out: Path, python: str = sys.executable) -> None:
    """Run grpc_tools.protoc over ROOT/protos/*.proto into OUT/protos (as scripts/gen_protos.sh does)."""
    (out / "protos").mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(root)) for p in (root / "protos").glob("*.proto"))
    if not protos:
        raise ValueError(f"no .proto files in {root / 'protos'}")
    subprocess.run(
        [python, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out}", f"--grpc_python_out={out}",
         f"--pyi_out={out}", *protos],
        cwd=root, check=True, timeout=120,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"]:  # regenerate protos/ in place (scripts/gen_protos.sh)
        root = Path(argv[1] if len(argv) > 1 else ".").resolve()
        generate(root, root)
        print("generated: " + " ".join(sorted(p.name for p in (root / "protos").glob("*_pb2*.py*"))))
        return 0
    root = Path(argv[0] if argv else ".").resolve()
    tools = importlib.metadata.version("grpcio-tools")
    with tempfile.TemporaryDirectory() as scratch:
        generate(root, Path(scratch))
        problems, notes = compare(root / "protos", Path(scratch) / "protos", tools)
    for note in notes:
        print(note)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("run scripts/gen_protos.sh to regenerate protos/", file=sys.stderr)
        return 1
    print(f"protos/ matches the .proto files (checked with grpcio-tools {tools})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
