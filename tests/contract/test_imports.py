"""Import hygiene: the contract stands alone, and no package has an import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("sidecar", "instrumentation", "grpc", "torch", "opentelemetry", "google")


@pytest.mark.parametrize("module,allowed", [
    ("contract.config", ()),
    ("contract.attributes", ()),
    ("redaction", ()),  # the rule engine runs in the app and the sidecar alike
])
def test_imports_neither_the_sidecar_nor_grpc_torch_or_the_sdk(module, allowed):
    code = (f"import sys, {module}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == repr(sorted(allowed)), r.stdout


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ``known`` that ``name`` imports when it runs (anywhere but under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """Counting imports inside functions too: a late import that closes a loop is still a loop."""
    known = {}
    for package in ("contract", "redaction", "sidecar"):
        known.update(_modules(package))
    graph = {name: _runtime_imports(name, path, known) for name, path in known.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = [" -> ".join(c + c[:1]) for c in _cycles(graph)]
    assert cycles == [], "modules that import each other (directly or round a loop):\n" + "\n".join(cycles)


def test_config_and_registry_do_not_import_each_other():
    known = _modules("sidecar")
    assert "sidecar.config" not in _runtime_imports("sidecar.registry", known["sidecar.registry"], known)
    tree = ast.parse(known["sidecar.registry"].read_text())
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "sidecar.config" for n in ast.walk(tree)), \
        "registry.py must not import the config loader, not even for type checking"
