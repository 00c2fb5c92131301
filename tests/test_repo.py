"""Repository-wide rules: no machine paths in tracked files, no import circles between rooms."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINE_PATHS = ("/work/", "../shared", "/home/", "/Users/")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in names.splitlines():
        path = ROOT / name
        if path.suffix in {".safetensors", ".png", ".jpg"} or not path.is_file():
            continue
        try:
            yield name, path.read_text()
        except UnicodeDecodeError:
            continue


def test_no_machine_paths_in_tracked_files():
    me = Path(__file__).name
    hits = [f"{name}:{i}: {line.strip()}"
            for name, text in tracked_text_files() if not name.endswith(me)
            for i, line in enumerate(text.splitlines(), 1)
            if any(p in line for p in MACHINE_PATHS)]
    assert hits == []


def test_docs_cited_by_kernels_exist():
    text = (ROOT / "mlx_v4" / "kernels" / "_base.py").read_text()
    assert "docs/kernels.md" in text
    assert (ROOT / "docs" / "kernels.md").is_file()


# ---- import graph --------------------------------------------------------------------------------
# source folder -> the package it installs as (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"mlx_v4": "mlx_v4", "cli": "mlx_v4.cli", "quantize": "mlx_v4.quantize"}


def _module_names() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((package, *rel))] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth (function-level imports too:
    a lazy import is still a dependency)."""
    import ast

    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # a name, else its module
            else:
                continue
            for t in targets:
                t = "mlx_v4.cli" + t[3:] if t == "cli" or t.startswith("cli.") else t
                t = "mlx_v4.quantize" + t[8:] if t == "quantize" or t.startswith("quantize.") else t
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps - {"mlx_v4"}  # the top package's __init__ (its lazy exports) is no room
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_kernels_never_import_layers():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("mlx_v4.layers"))
           for m, deps in graph.items() if m.startswith("mlx_v4.kernels")}
    assert {m: d for m, d in bad.items() if d} == {}
    assert "mlx_v4.kernels.attend" in graph["mlx_v4.layers.attention"]  # the one-way direction


def test_convert_and_upload_do_not_import_each_other_both_ways():
    graph = import_graph()
    assert "mlx_v4.quantize.convert" not in graph["mlx_v4.quantize.upload"]


def test_library_never_imports_cli_or_quantize():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith(("mlx_v4.cli", "mlx_v4.quantize")))
           for m, deps in graph.items() if not m.startswith(("mlx_v4.cli", "mlx_v4.quantize"))}
    assert {m: d for m, d in bad.items() if d} == {}


# Circles that exist and are known, each with what breaking it takes. The test fails on any new
# circle, and when one of these is broken (then delete it here).
KNOWN_CIRCLES: list[list[str]] = []


def test_no_import_circles():
    assert _cycles(import_graph()) == KNOWN_CIRCLES
