"""Where code runs, held by its imports (docs/design.md, "Code map").

- ``boot/`` runs in the initramfs: it imports neither the operator verbs (``ops/``), nor the
  image-build code (``image/``), nor the command line, even lazily.
- ``ops/`` and ``image/`` may use the shared core and nothing of each other.
- No import cycle anywhere in ``src/encryptrootfs``, lazy imports included (the old circle
  boot -> unlock -> recovery -> status -> boot ran only because one edge sat in a function).

Read from the sources with :mod:`ast` (no interpreter is started): imports under
``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import encryptrootfs

ROOT = Path(encryptrootfs.__file__).resolve().parent
PACKAGE = "encryptrootfs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str) -> set[str]:
    """The modules of this package that ``name`` imports, at top level or in a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{a.name}" for a in node.names]
            # `from . import x` imports the module x; `from .m import name` imports m.
            targets = [m for m in submodules if m in MODULES] or [source]
        else:
            continue
        found.update(t for t in targets if t in MODULES)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: closure() adds those, while the
    # edges here stay the ones written (a submodule importing its own package is no cycle).
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def closure(start: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += GRAPH[mod]
    return seen


def under(names: Iterable[str], *folders: str) -> set[str]:
    prefixes = tuple(f"{PACKAGE}.{f}" for f in folders)
    return {n for n in names if n in prefixes or n.startswith(tuple(p + "." for p in prefixes))}


def test_the_boot_imports_no_operator_verb_and_no_build_code() -> None:
    for entry in ("encryptrootfs.boot.unlock", "encryptrootfs.boot.first_boot"):
        pulled = closure([entry])
        assert not under(pulled, "ops", "image", "cli"), entry
    every_boot_module = closure(under(MODULES, "boot"))
    assert not under(every_boot_module, "ops", "image", "cli")


def test_operator_verbs_and_build_code_do_not_reach_into_each_other_or_the_boot() -> None:
    assert not under(closure(under(MODULES, "ops")), "image", "cli", "boot")
    assert not under(closure(under(MODULES, "image")), "ops", "cli", "boot")


def test_no_import_cycle_in_the_package() -> None:
    # A cycle exists iff some module reaches itself through the imports it writes.
    cycles = []
    for name in MODULES:
        reach: set[str] = set()
        todo = list(GRAPH[name])
        while todo:
            mod = todo.pop()
            if mod in reach:
                continue
            reach.add(mod)
            todo += GRAPH[mod]
        if name in reach:
            cycles.append(name)
    assert cycles == []


def test_the_graph_sees_a_cycle_when_there_is_one() -> None:
    # The detector itself: the old lazy edge from status back into the boot closes a circle
    # (boot -> devices is real; status -> boot would make boot reach status and back).
    saved = set(GRAPH["encryptrootfs.devices"])
    GRAPH["encryptrootfs.devices"].add("encryptrootfs.boot")
    try:
        assert "encryptrootfs.devices" in closure(GRAPH["encryptrootfs.devices"])
    finally:
        GRAPH["encryptrootfs.devices"] = saved
    assert "encryptrootfs.image.initramfs" in closure(["encryptrootfs.cli"])
