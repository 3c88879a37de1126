"""The package's import graph: imports run one way (no circle), and the shared vocabulary is a leaf."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "torchdiag"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The torchdiag modules ``path`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "torchdiag")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "torchdiag":
                continue
            for a in node.names:  # `from . import stats` imports the module torchdiag.stats
                sub = f"{target}.{a.name}"
                found.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path a -> ... -> a), or None. Packages (``torchdiag.sinks``) import their
    ``__init__`` only, which is what the graph holds for them."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_reads_every_module():
    graph = _graph()
    assert "torchdiag.record.buffer" in graph and "torchdiag.sinks.tensorboard" in graph
    assert "torchdiag.vocab" in graph["torchdiag.record.buffer"]


def test_no_import_circle_inside_torchdiag():
    graph = {m: {n for n in deps if n != "torchdiag"} for m, deps in _graph().items()}  # __init__ re-exports only
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_leaf_modules_import_nothing_of_torchdiag():
    graph = _graph()
    for leaf in ("torchdiag.vocab", "torchdiag.errors", "torchdiag.reduce.dtensor", "torchdiag.reduce.accumulators",
                 "torchdiag.report.tags"):
        assert graph[leaf] == set(), (leaf, graph[leaf])


def test_sinks_and_diagnosis_know_nothing_of_hooks():
    graph = _graph()
    hook_side = {"torchdiag.record.buffer", "torchdiag.capture.capture", "torchdiag.watch", "torchdiag.training.optim"}
    for m in ("torchdiag.diagnose.diagnose", "torchdiag.diagnose._rules", "torchdiag.diagnose._drift",
              "torchdiag.report.report", "torchdiag.report.render", "torchdiag.diagnose.verdict",
              "torchdiag.sinks.console", "torchdiag.sinks.tensorboard", "torchdiag.sinks.overview",
              "torchdiag.sinks.png", "torchdiag.sinks.layout", "torchdiag.cli._summarize", "torchdiag.cli._logreader",
              "torchdiag.sinks.eventfiles", "torchdiag.report.tags", "torchdiag.reduce._reduction",
              "torchdiag.stats.stats", "torchdiag.config"):
        assert not graph[m] & hook_side, (m, graph[m] & hook_side)


def test_summarize_reads_the_tag_schema_not_the_sink():
    graph = _graph()
    for m in ("torchdiag.cli._summarize", "torchdiag.cli._logreader"):
        # the event files' format (CRC32C, which files are a run's) is shared by the writer and the reader
        assert not {n for n in graph[m] if n.startswith("torchdiag.sinks")} - {"torchdiag.sinks.eventfiles"}, m
    assert "torchdiag.report.tags" in graph["torchdiag.cli._logreader"]
    assert "torchdiag.report.tags" in graph["torchdiag.sinks.tensorboard"]


def test_the_readme_inside_map_names_every_module_and_only_modules_that_exist():
    readme = (PKG.parent / "README.md").read_text()
    inside = readme[readme.index("## Inside"):]
    inside = inside[:inside.index("\n## ", 1)]
    named = {n for n in re.findall(r"`([\w/]+\.py)`", inside) if not n.startswith("tests/")}
    files = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert named == files, (sorted(files - named), sorted(named - files))
