"""The layering rule of CONTRIBUTING.md, read from the source with `ast`, and the absence of import cycles.

    tunelab.core    imports no other part of tunelab: models know nothing of how they are adapted or compressed
    tunelab.peft    imports core (only peft.qlora may also import quant)
    tunelab.quant   imports core
    tunelab.tasks   imports core, peft and quant; jobs never import each other (they share tasks.runs)
    tunelab.cli     imports tasks (and core)
Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tunelab"
# area -> the areas it may import (its own included)
ALLOWED = {
    "core": {"core"},
    "peft": {"core", "peft"},
    "quant": {"core", "quant"},
    "tasks": {"core", "peft", "quant", "tasks"},
    "cli": {"core", "tasks", "cli"},
}
EXCEPTIONS = {("tunelab.peft.qlora", "quant")}  # QLoRA is LoRA on a quantized base
JOBS = ("tunelab.tasks.imdb_classification", "tunelab.tasks.imdb_finetune", "tunelab.tasks.imdb_mlm")


def module_name(file: Path, root: Path) -> str:
    parts = file.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports}, for every .py file under `root`."""
    files = {module_name(f, root): f for f in sorted(root.rglob("*.py"))}
    graph = {}
    for name, file in files.items():
        is_package = file.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from . import x / from ..core import y
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # `from tunelab.tasks import runs` imports the module tunelab.tasks.runs
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        allowed = ALLOWED.get(area(module))
        for target in sorted(targets):
            if allowed is None or area(target) in allowed or (module, area(target)) in EXCEPTIONS:
                continue
            found.append(f"{module} imports {target}")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_package_follows_the_layering_rule():
    graph = imports_of(PACKAGE)
    assert "tunelab.core.bert" in graph and "tunelab.tasks.runs" in graph["tunelab.tasks.imdb_finetune"]
    assert layering_violations(graph) == []


def test_the_package_has_no_import_cycle():
    assert find_cycle(imports_of(PACKAGE)) is None


def test_the_jobs_never_import_each_other():
    graph = imports_of(PACKAGE)
    for job in JOBS:
        assert not graph[job] & set(JOBS), f"{job} imports {sorted(graph[job] & set(JOBS))}"


@pytest.fixture
def toy_package(tmp_path):
    """A package that breaks both rules: core imports tasks, lazily, and two jobs import each other."""
    root = tmp_path / "tunelab"
    for folder in ("core", "tasks"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "core" / "model.py").write_text("def f():\n    from tunelab.tasks import job_a\n")
    (root / "tasks" / "job_a.py").write_text("from tunelab.tasks.job_b import x\nfrom . import runs\n")
    (root / "tasks" / "job_b.py").write_text("import tunelab.tasks.job_a\nx = 1\n")
    (root / "tasks" / "runs.py").write_text("from ..core import model\n")
    return root


def test_the_checks_find_a_lazy_upward_import_and_a_cycle(toy_package):
    graph = imports_of(toy_package)
    assert graph["tunelab.tasks.job_a"] == {"tunelab.tasks.job_b", "tunelab.tasks.runs"}
    assert graph["tunelab.tasks.runs"] == {"tunelab.core.model"}
    assert layering_violations(graph) == ["tunelab.core.model imports tunelab.tasks.job_a"]
    assert find_cycle(graph) in (["tunelab.core.model", "tunelab.tasks.job_a", "tunelab.tasks.runs",
                                  "tunelab.core.model"],
                                 ["tunelab.tasks.job_a", "tunelab.tasks.job_b", "tunelab.tasks.job_a"])
