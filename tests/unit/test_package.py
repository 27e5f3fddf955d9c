"""The package as installed: one namespace in the wheel, a light import, no import cycles,
and the model library independent of the job."""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "faiss", "pyarrow", "deltalake")
PACKAGES = ("pipeline", "encoders", "jobs", "infra")


def _wheel(tmp_path) -> Path:
    """A wheel built from a copy of the checkout (setuptools leaves build/ behind in the
    tree it builds from, and a stale build/ would leak into the next wheel)."""
    import shutil

    import setuptools

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache"))

    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)]
    if int(setuptools.__version__.split(".")[0]) >= 68:  # pyproject's floor: build with it, no download
        args.insert(5, "--no-build-isolation")
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = tmp_path.glob("sparse_embed-*.whl")
    return wheel


def test_wheel_holds_one_top_level_package_and_nothing_test_only(tmp_path):
    wheel = zipfile.ZipFile(_wheel(tmp_path))
    names = wheel.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"sparse_embed", "sparse_embed-0.1.0.dist-info"}, sorted(tops)
    assert not [n for n in names if "/tests/" in n or "/benchmarks/" in n or "fault_proxy" in n or n.endswith("conftest.py")]
    for module in ("sparse_embed/__init__.py", "sparse_embed/jobs/cli.py", "sparse_embed/pipeline/embed/run.py",
                   "sparse_embed/pipeline/index/build.py", "sparse_embed/pipeline/store/tables.py",
                   "sparse_embed/encoders/_factory.py", "sparse_embed/infra/k8s/raycluster.yaml"):
        assert module in names
    entry = wheel.read("sparse_embed-0.1.0.dist-info/entry_points.txt").decode()
    assert "sparse-embed = sparse_embed.jobs.cli:main" in entry


@pytest.mark.parametrize("code", [
    "import sparse_embed",
    "from sparse_embed.jobs.cli import build_parser; build_parser().format_help()",
])
def test_the_package_and_the_cli_help_import_nothing_heavy(code):
    probe = f"import sys; {code}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"{code!r} imported {out.stdout.strip()}"
    helped = subprocess.run([sys.executable, "-m", "sparse_embed.jobs.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "usage: sparse-embed" in helped.stdout


def _import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere in its body (function-level included)."""
    files = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("sparse_embed",) + (parts[:-1] if parts[-1] == "__init__" else parts))
            files[name] = p
    graph = {}
    for name, p in files.items():
        package = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            for bare in PACKAGES:  # the old top-level names must be gone
                if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and not node.level):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(m == bare or m.startswith(bare + ".") for m in mods), f"{p}: imports {mods}"
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan; recursive: the graph is small)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_and_encoders_import_nothing_from_pipeline():
    graph = _import_graph()
    assert _cycles(graph) == []
    leaks = {m: sorted(d for d in deps if not d.startswith("sparse_embed.encoders"))
             for m, deps in graph.items() if m.startswith("sparse_embed.encoders")}
    assert not {m: d for m, d in leaks.items() if d}, leaks


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
