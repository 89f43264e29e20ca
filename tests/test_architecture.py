"""The import graph of the pack, computed from the source: no cycles, and x2i_core never imports ComfyUI."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("x2i_core", "nodes")
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "nodes", "node_helpers", "folder_paths", "server", "execution"}


def _modules() -> dict[str, str]:
    mods = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(name: str, path: str) -> set[str]:
    """Absolute names of everything ``name`` imports (module level and inside functions alike)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _graph():
    mods = _modules()
    return mods, {m: {d for d in _imports(m, p) if d in mods and d != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_cycles():
    _, graph = _graph()
    assert graph["nodes.x2i_nodes"], "the import graph came out empty: the resolver is broken"
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_x2i_core_never_imports_comfyui():
    mods = _modules()
    for name, path in mods.items():
        if name.startswith("x2i_core"):
            bad = {i for i in _imports(name, path) if i.split(".")[0] in COMFY_MODULES}
            assert not bad, f"{name} imports {bad}"


def test_node_files_share_only_through_common():
    """A node file (``nodes/*_nodes.py``: schemas and execute bodies) imports no other node file; shared pieces
    come from ``nodes/common.py`` and host adapters (``nodes/comfy_*.py``, ``models.py``)."""
    mods, graph = _graph()
    node_files = {m for m in mods if m.startswith("nodes.") and m.endswith("_nodes")}
    assert {"nodes.x2i_nodes", "nodes.clip_nodes", "nodes.lightcontrol_nodes"} <= node_files
    for m in sorted(node_files):
        assert not (graph[m] & node_files), f"{m} imports the node file(s) {sorted(graph[m] & node_files)}"
