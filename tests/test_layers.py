"""The package's layers, checked from its source: no import cycle among
pymw_magic's modules, no module taking another's ``_private`` names, and
every module importing only from its own layer or below.

Every module is read as an AST (never imported); every import counts —
at the top, inside functions, under ``if TYPE_CHECKING:`` — with relative
imports resolved.  ``from . import x`` counts as importing the submodule
``x`` when there is one, else the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT as _ROOT

ROOT = Path(_ROOT)
PACKAGE = "pymw_magic"
SOURCE = ROOT / PACKAGE


# Imports allowed against the rules below, each with its reason; keep it short.
ALLOWED_UPWARD: set[tuple[str, str]] = {
    # A report draws its timeline (an optional widget) on demand; the
    # timeline is plain HTML, imported only when asked for.
    ("pymw_magic.simulation.report", "pymw_magic.widgets.timeline"),
}
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()

# Bottom to top; a module imports only from its own layer (without a loop)
# or from below.  A package's modules are listed by the package's name
# unless one of them sits elsewhere (simulation.magic is the %pymw tune
# front end).  The facade, pymw_magic/__init__.py, is above them all.
LAYERS: list[tuple[str, list[str]]] = [
    # cellfunc: how a cell's function travels (payload sends its BoundCell)
    # codec, ed25519: the batch family's safe results and signatures (stdlib only)
    # reaper: a worker's descendants (stdlib only; both workers)
    ("data and the wire", ["errors", "task", "payload", "transport", "version", "cellfunc",
                           "environment", "codec", "ed25519", "reaper"]),
    # oneshot, runtime, jobdir: the batch family's worker, its shipped zipapp, its files
    ("the core", ["policies", "rules", "events", "job", "scheduler", "worker", "oneshot", "runtime",
                  "jobdir", "boinc_app"]),
    ("the engine", ["master", "backends", "simulation"]),
    ("what front ends share", ["options", "session", "progress", "store", "reattach"]),
    ("ipywidgets", ["widgets"]),
    ("front ends", ["magics", "awaiting", "export", "script", "cli", "simulation.magic", "compat", "server",
                     "testing"]),
    ("the facade", [""]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


MODULES = all_modules()


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) of every import in
    ``path`` that names a module of the package."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, is_package, node)
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # from . import magics: the submodule
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports_of(name, path):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def layer_of(module: str) -> int:
    """The layer of ``module``: the longest entry of LAYERS that names it or a package above it."""
    short = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (short == entry or (entry and short.startswith(entry + "."))) and len(entry) > best_len:
                best, best_len = index, len(entry)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as its modules in order, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def checked_edges() -> dict[str, set[str]]:
    edges = graph()
    for importer, imported in ALLOWED_UPWARD:
        edges.get(importer, set()).discard(imported)
    return edges


# --- the tests ---------------------------------------------------------------------------

def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_cycle():
    cycle = find_cycle(checked_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for importer, targets in checked_edges().items():
        for imported in targets:
            if layer_of(imported) > layer_of(importer):
                wrong.append(f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
                             f"({LAYERS[layer_of(imported)][0]})")
    assert not wrong, "upward imports:\n" + "\n".join(sorted(wrong))


def test_no_module_takes_another_modules_private_names():
    taken = []
    for name, path in MODULES.items():
        for target, imported, line in imports_of(name, path):
            if imported is None or not imported.startswith("_") or imported.startswith("__"):
                continue
            if target != name and (name, target, imported) not in ALLOWED_PRIVATE:
                taken.append(f"{path.relative_to(ROOT)}:{line}: {imported} from {target}")
    assert not taken, "private names imported from other modules:\n" + "\n".join(taken)


def test_allow_lists_name_only_imports_that_exist():
    """An allow-list entry whose import is gone is removed, so the lists stay short."""
    edges = graph()
    stale = [edge for edge in ALLOWED_UPWARD if edge[1] not in edges.get(edge[0], ())]
    stale += [entry for entry in ALLOWED_PRIVATE
              if (entry[1], entry[2]) not in {(t, n) for t, n, _ in imports_of(entry[0], MODULES[entry[0]])}]
    assert not stale, f"allow-list entries with no such import (delete them): {stale}"


# The checker itself, on made-up modules: it must see what it is meant to see.

@pytest.mark.parametrize("edges, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_find_cycle(edges, cycle):
    assert find_cycle(edges) == cycle


def test_imports_inside_functions_and_type_checking_blocks_count(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from .job import Job\n"
                      "def f():\n    from .widgets import jobview\n    from . import _hidden\n"
                      "    from .master import _live\n    import pymw_magic.options\n")
    found = imports_of("pymw_magic.x", source)
    assert ("pymw_magic.job", "Job", 3) in found
    assert ("pymw_magic.widgets.jobview", None, 5) in found
    assert ("pymw_magic", "_hidden", 6) in found
    assert ("pymw_magic.master", "_live", 7) in found
    assert ("pymw_magic.options", None, 8) in found


def test_layer_of_takes_the_most_specific_entry():
    assert LAYERS[layer_of("pymw_magic.simulation.magic")][0] == "front ends"
    assert LAYERS[layer_of("pymw_magic.simulation.engine")][0] == "the engine"
    assert LAYERS[layer_of("pymw_magic")][0] == "the facade"
