"""The walls between the stages, checked on the import graph of the package (static, transitive).

Every import statement counts, at module level or inside a function, except those under `if TYPE_CHECKING:`
(they never run). Importing `a.b.c` also runs the packages `a` and `a.b`, so those count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distfinalize"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """distfinalize's modules by dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = module_files()


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path, name: str) -> set[str]:
    """Every module `path` imports (dotted), resolved against the package's own modules."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _type_checking(node)
        for n in ast.walk(node)
        if n is not node
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    with_parents = set(found)
    for module in found:
        if not module.startswith("distfinalize"):
            continue
        parts = module.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return with_parents


@cache
def direct(name: str) -> frozenset[str]:
    return frozenset(imported_names(MODULES[name], name))


def closure(name: str) -> set[str]:
    """Every module `name` imports, directly or through the package's other modules."""
    seen, todo = set(), [name]
    while todo:
        for child in direct(todo.pop()):
            if child not in seen:
                seen.add(child)
                if child in MODULES:
                    todo.append(child)
    return seen


def under(names: Iterable[str], *prefixes: str) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def in_package(prefix: str) -> list[str]:
    return under(MODULES, prefix)


# Modules that read or write files or talk to other ranks: plan may import none of them. (It may use
# huggingface_hub's shard splitter on meta tensors, and a quantization recipe may build transformers' config
# dict: both pure.)
IO_MODULES = (
    "torch.distributed",
    "distfinalize.dist",
    "distfinalize.write",
    "distfinalize.commit",
    "distfinalize.artifacts",
    "distfinalize.commands",
    "distfinalize.pipeline",
    "distfinalize.prepare",
    "distfinalize.sources.dcp",
    "distfinalize.sources.distcp",
    "distfinalize.sources.deepspeed",
    "distfinalize.sources.hf",
    "distfinalize.sources.locate",
    "distfinalize.sources.formats",
    "safetensors",
    "shutil",
    "tempfile",
    "subprocess",
    "io",
    "mmap",
    "pickle",
)


def test_plan_imports_no_io_and_no_torch_distributed() -> None:
    assert under(closure("distfinalize.plan"), *IO_MODULES) == []


# The classes a per-rank torch.save of DTensors names (DTensor, its placements, DeviceMesh): allowed for unpickling
# by the module that reads such files, which runs no collective.
DTENSOR_TYPES = {"distfinalize.sources.ranksave": ("torch.distributed.tensor", "torch.distributed.device_mesh")}


def test_only_dist_uses_torch_distributed() -> None:
    """Collectives live in dist/ alone; elsewhere only DCP's checkpoint format modules may be imported (and the
    DTensor types, by the reader of per-rank DTensor files)."""
    offenders = {
        name: found
        for name in MODULES
        if not name.startswith("distfinalize.dist")
        and (
            found := [
                m
                for m in under(direct(name), "torch.distributed")
                if not m.startswith(("torch.distributed.checkpoint", *DTENSOR_TYPES.get(name, ())))
            ]
        )
    }
    assert offenders == {}


@pytest.mark.parametrize("source", in_package("distfinalize.sources"))
def test_sources_never_import_write_commit_or_artifacts(source: str) -> None:
    assert under(closure(source), "distfinalize.write", "distfinalize.commit", "distfinalize.artifacts") == []


@pytest.mark.parametrize("module", in_package("distfinalize.transform"))
def test_transform_never_imports_dist(module: str) -> None:
    assert under(closure(module), "distfinalize.dist", "torch.distributed.distributed_c10d") == []


def test_cli_reaches_the_rest_only_through_commands_and_config() -> None:
    """cli's own imports: the commands package (whose modules load lazily), config, and the startup leaf."""
    ours = under(direct("distfinalize.cli"), "distfinalize")
    allowed = {"distfinalize", "distfinalize.commands", "distfinalize.config", "distfinalize.startup"}
    assert set(ours) <= allowed, sorted(set(ours) - allowed)
    assert under(direct("distfinalize.startup"), "distfinalize") == []


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over the package's own modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(direct(node) & MODULES.keys()):
            if child == node:
                continue
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for name in sorted(MODULES):
        if name not in index:
            visit(name)
    return out


def test_no_import_circles() -> None:
    """A package's own __init__ importing its submodules is not a circle (they import the package first)."""
    real = [c for c in cycles() if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert real == []


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > 420} == {}


def test_a_planted_violation_is_caught(tmp_path: Path) -> None:
    """The checker itself: a module of a copy of the package that imports a wrong stage is found."""
    fake = tmp_path / "distfinalize"
    (fake / "sources").mkdir(parents=True)
    (fake / "commit").mkdir()
    for init in (fake, fake / "sources", fake / "commit"):
        (init / "__init__.py").write_text("")
    (fake / "commit" / "finish.py").write_text("import os\n")
    (fake / "sources" / "bad.py").write_text("def f():\n    from distfinalize.commit import finish\n")
    names = module_files(fake)
    found = imported_names(names["distfinalize.sources.bad"], "distfinalize.sources.bad")
    assert "distfinalize.commit.finish" in found and "distfinalize.commit" in found
