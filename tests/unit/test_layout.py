"""The package's import graph: imports run one way (no circle), stage packages import only earlier stages and the
shared vocabulary, and the shared vocabulary is a leaf."""

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
            for a in node.names:  # `from . import stats` imports the module torchdiag._stats
                sub = f"{target}.{a.name}"
                found.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path a -> ... -> a), or None. Packages (``torchdiag._sinks``) import their
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


# The stages in dependency order: each imports, at run time, only earlier stages and the shared vocabulary.
# ``watch`` (torchdiag/watch.py and its argument checks) wires the stages before it; ``check()`` and the command line
# are built on it. torchdiag/__init__.py and __main__.py (the public surface) may import any stage.
SHARED = ("torchdiag.errors", "torchdiag.config", "torchdiag._vocab")
STAGES = ("layers", "reduce", "stats", "capture", "record", "training", "report", "diagnose", "sinks", "origin",
          "signals", "watch", "checks", "cli", "integrations")
TOP_STAGE = {"torchdiag.watch": "watch", "torchdiag._arguments": "watch"}
SURFACE = ("torchdiag", "torchdiag.__main__", "torchdiag._lazy")


def _stage(module: str) -> int:
    """0 for the shared vocabulary, 1 + the index in STAGES for a stage's module, len(STAGES) + 1 for the surface."""
    if module in SHARED:
        return 0
    if module in SURFACE:
        return len(STAGES) + 1
    if module in TOP_STAGE:
        return 1 + STAGES.index(TOP_STAGE[module])
    part = module.split(".")[1].lstrip("_")  # a stage's package is private: torchdiag._capture is "capture"
    assert part in STAGES, f"{module}: in no stage of STAGES (a new package? place it in the order)"
    return 1 + STAGES.index(part)


def test_the_graph_reads_every_module():
    graph = _graph()
    assert "torchdiag._record.buffer" in graph and "torchdiag._sinks.tensorboard" in graph
    assert "torchdiag._vocab" in graph["torchdiag._record.buffer"]
    assert "torchdiag._diagnose.instability" in graph["torchdiag._signals.sentinel"]  # `from .._diagnose import x`


def test_no_import_circle_inside_torchdiag():
    graph = {m: {n for n in deps if n != "torchdiag"} for m, deps in _graph().items()}  # __init__ re-exports only
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_a_stage():
    for m in _graph():
        _stage(m)


def test_stages_import_only_earlier_stages_and_the_shared_vocabulary():
    later = []
    for m, deps in _graph().items():
        for n in deps:
            if n != "torchdiag" and _stage(n) > _stage(m):
                later.append(f"{m} -> {n}")
    assert not later, "imports of a later stage:\n" + "\n".join(sorted(later))


def test_a_later_import_is_found():
    assert _stage("torchdiag._diagnose.diagnose") < _stage("torchdiag._signals.signals")
    assert _stage("torchdiag._vocab") < _stage("torchdiag._layers.gains") < _stage("torchdiag._capture.capture")
    assert _stage("torchdiag._record.buffer") < _stage("torchdiag.watch") < _stage("torchdiag._checks.checking")


def test_leaf_modules_import_nothing_of_torchdiag():
    graph = _graph()
    for leaf in ("torchdiag._vocab", "torchdiag.errors", "torchdiag._reduce.dtensor", "torchdiag._reduce.accumulators",
                 "torchdiag._report.tags"):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    assert graph["torchdiag.config"] == {"torchdiag.errors"}


def test_diagnosis_report_and_sinks_know_nothing_of_hooks():
    graph = _graph()
    hook_side = ("torchdiag._capture", "torchdiag._stats", "torchdiag._record", "torchdiag.watch",
                 "torchdiag._training.optim")
    for m, deps in graph.items():
        if m.split(".")[1:2] and m.split(".")[1] in ("_diagnose", "_report", "_sinks"):
            bad = {n for n in deps if n.startswith(hook_side)}
            assert not bad, (m, bad)


def test_package_inits_hand_names_on_and_private_modules_stay_in_their_package():
    graph = _graph()
    for p in PKG.rglob("__init__.py"):
        tree = ast.parse(p.read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, (p, [d.name for d in defs])
    for m, deps in graph.items():
        package = m if (PKG.parent / m.replace(".", "/")).is_dir() else m.rpartition(".")[0]
        for n in deps:
            is_file = (PKG.parent / n.replace(".", "/")).with_suffix(".py").exists()  # a module, not a package
            if is_file and n.rpartition(".")[2].startswith("_") and n not in (*SHARED, "torchdiag.__main__"):
                assert n.rpartition(".")[0] == package, (m, n)


def test_summarize_reads_the_tag_schema_not_the_sink():
    graph = _graph()
    for m in ("torchdiag.cli._summarize", "torchdiag.cli._logreader"):
        # the event files' format (CRC32C, which files are a run's) is shared by the writer and the reader
        sinks = {n for n in graph[m] if n.startswith("torchdiag._sinks")} - {"torchdiag._sinks.eventfiles"}
        assert not sinks, (m, graph[m])
    assert "torchdiag._report.tags" in graph["torchdiag.cli._logreader"]
    assert "torchdiag._report.tags" in graph["torchdiag._sinks.tensorboard"]


def test_the_internals_map_names_every_module_and_only_modules_that_exist():
    page = (PKG.parent / "docs" / "internals.md").read_text()
    inside = page[page.index("## Stages and files"):]
    inside = inside[:inside.index("\n## ", 1)] if "\n## " in inside[1:] else inside
    named = {n for n in re.findall(r"`([\w/]+\.py)`", inside) if not n.startswith("tests/")}
    files = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert named == files, (sorted(files - named), sorted(named - files))


def test_only_the_public_surface_has_public_names_at_the_top():
    public = {"__init__.py", "__main__.py", "watch.py", "config.py", "errors.py", "cli", "integrations"}
    top = {p.name for p in PKG.iterdir() if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert public <= top, public - top
    assert all(name in public or name.startswith("_") for name in top), sorted(top - public)
