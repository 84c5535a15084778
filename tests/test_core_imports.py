"""The core's modules import downwards only, TYPE_CHECKING imports
included: no loop among them, and a Job reaches its viewer and report
through registration, never by naming the layers above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pymw_magic"
CORE = ["errors", "task", "payload", "transport", "policies", "events", "job", "scheduler", "worker"]


def imports_of(name: str) -> set[str]:
    """Modules of pymw_magic that ``name`` imports anywhere (functions and
    ``if TYPE_CHECKING:`` blocks included)."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pymw_magic."):
            out.add(node.module.split(".")[1])
    return out


def test_no_import_loop_among_the_core_modules():
    graph = {m: imports_of(m) & set(CORE) for m in CORE}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    loops = sorted(m for m in CORE if m in reach(m))
    assert not loops, {m: sorted(graph[m]) for m in loops}


@pytest.mark.parametrize("name", CORE)
def test_core_modules_do_not_name_the_layers_above(name):
    above = {"master", "backends", "simulation", "options", "session", "progress", "widgets",
             "magics", "export", "script", "cli", "awaiting"}
    assert not imports_of(name) & above


def test_a_job_without_a_registered_viewer_shows_its_plain_repr(monkeypatch):
    import pymw_magic.job as job_module
    from pymw_magic import Master
    from pymw_magic.errors import PymwError

    monkeypatch.setattr(job_module, "_viewer", None)
    monkeypatch.setattr(job_module, "_reporter", None)
    with Master("local", workers=1) as m:
        job = m.map_async(abs, [-1])
        assert job.result(timeout=60) == [1]
        assert job._repr_mimebundle_() is None
        with pytest.raises(PymwError, match="set_reporter"):
            job.report()
        seen = []
        job_module.set_viewer(lambda j, include, exclude: seen.append(j) or {"text/plain": "viewed"})
        job_module.set_reporter(lambda j: ("report of", j.name))
        assert job._repr_mimebundle_() == {"text/plain": "viewed"} and seen == [job]
        assert job.report() == ("report of", job.name)
