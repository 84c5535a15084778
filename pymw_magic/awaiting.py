"""Blocking ``%%pymw`` cells that wait without blocking the kernel.

This module owns one thing: in a Jupyter kernel, a blocking ``%%pymw`` cell
*awaits* its job instead of holding the kernel's main thread, so that the
kernel goes on handling widget messages — the inline widget's Cancel button,
the dashboard — while the cell waits.

Why: a kernel handles every shell message (cell executions and widget
messages alike) on its main thread.  A cell that blocks in ``job.wait()``
leaves a button click queued until the cell ends.  A cell that awaits
yields to the kernel's event loop instead, and ipykernel (7.4 and later)
dispatches widget messages while an awaiting cell runs; execute requests
still wait their turn, so cells keep running one after another.

How::

    %%pymw --map x in xs          IPython's own transform
    body            ─────────────▶  get_ipython().run_cell_magic('pymw', LINE, BODY)
                                            │ our post-transform (only top level,
                                            ▼ only in a kernel with autoawait)
            await <this module>.run_cell(get_ipython(), LINE, BODY)
                                            │
                                            ▼
            PymwMagics.run_cell_async: validate, submit, show the widget,
            ``await job.wait_async()``, bind results, raise failures

Only the top-level cell is rewritten: a ``%%pymw`` cell run by another magic
(``%%capture``, ``%%time``) is executed synchronously by that magic and must
stay a plain call, so this module counts the cells being executed.
The kernel's stop button cancels the awaiting cell (ipykernel turns SIGINT
into a cancellation); :meth:`PymwMagics.run_cell_async` cancels the job and
reports a KeyboardInterrupt, as the blocking path does.

The same transform checks a ``%%pymw`` body's syntax before the cell runs,
in every IPython shell (a terminal too, where cells are not rewritten): a
SyntaxError raised while IPython transforms a cell is shown as the cell's
own error, at the body's line, with no frames of the machinery (raised once
the cell runs, it would show the rewritten line and this package's frames).
"""

from __future__ import annotations

import ast
from typing import Any, Coroutine, Protocol

__all__ = ["CellAwaiter", "CellRunner", "run_cell"]


class CellRunner(Protocol):
    """What the awaiter needs of the magics (:class:`pymw_magic.magics.PymwMagics`)."""

    def cell_filename(self, count: int | None = None, *, reserve: bool = True) -> tuple[str, str]: ...

    def run_cell_async(self, line: str, cell: str) -> Coroutine[Any, Any, Any]: ...


#: the awaiter installed on each shell (by id), which the rewritten cells find
_installed: dict[int, "CellAwaiter"] = {}

# What IPython's cell-magic transform produces for a %%pymw cell.
_CELL_CALL = "get_ipython().run_cell_magic('pymw', "
_AWAIT_CALL = "await __import__('pymw_magic').awaiting.run_cell(get_ipython(), "


class CellAwaiter:
    """Installed on the shell by ``%load_ext pymw_magic``: checks the syntax
    of ``%%pymw`` bodies and, in a kernel (``await_cells``), rewrites
    top-level ``%%pymw`` cells into an ``await`` of the magic."""

    def __init__(self, shell: Any, magics: CellRunner, *, await_cells: bool = True):
        self.shell = shell
        self.magics = magics
        self.await_cells = await_cells
        self._depth = 0  # cells being executed right now (nested runs > 1)

    @staticmethod
    def can_install(shell: Any) -> bool:
        """An IPython shell with post-transformers (IPython 7+)."""
        return hasattr(shell, "input_transformers_post") and hasattr(shell, "events")

    @staticmethod
    def applies_to(shell: Any) -> bool:
        """A Jupyter kernel's shell (it has a kernel and an asyncio loop runner)."""
        return getattr(shell, "kernel", None) is not None and CellAwaiter.can_install(shell)

    def install(self) -> None:
        _installed[id(self.shell)] = self
        self.shell.input_transformers_post.append(self.transform)
        self.shell.events.register("pre_execute", self._entered)
        self.shell.events.register("post_execute", self._left)

    def uninstall(self) -> None:
        if _installed.get(id(self.shell)) is self:
            del _installed[id(self.shell)]
        if self.transform in self.shell.input_transformers_post:
            self.shell.input_transformers_post.remove(self.transform)
        for event, fn in (("pre_execute", self._entered), ("post_execute", self._left)):
            try:
                self.shell.events.unregister(event, fn)
            except ValueError:
                pass

    def _entered(self) -> None:
        self._depth += 1

    def _left(self) -> None:
        self._depth = max(0, self._depth - 1)

    def _can_await(self) -> bool:
        from IPython.core.async_helpers import _asyncio_runner
        shell = self.shell
        return (self.await_cells and self._depth == 0 and bool(getattr(shell, "autoawait", False))
                and shell.loop_runner is _asyncio_runner)

    def transform(self, lines: list[str]) -> list[str]:
        if not (lines and lines[0].startswith(_CELL_CALL)):
            return lines
        self._check_syntax("".join(lines))
        if self._can_await():
            return [_AWAIT_CALL + lines[0][len(_CELL_CALL):]] + lines[1:]
        return lines

    def _check_syntax(self, code: str) -> None:
        """Raise the SyntaxError the magic would raise for this cell's body
        (at the body's line, under the filename the magic will use)."""
        from . import cellfunc
        try:
            call = ast.parse(code).body[0].value  # type: ignore[attr-defined]
            line, body = (ast.literal_eval(arg) for arg in call.args[1:3])
        except Exception:  # not the one call IPython makes of a cell magic: leave it to the magic
            return
        if not (isinstance(line, str) and isinstance(body, str)):
            return
        if line.rstrip().endswith("\\"):  # the magic says the line cannot be continued
            return
        # Not run yet: this cell's In[N] is the shell's execution_count now.
        filename, _ = self.magics.cell_filename(getattr(self.shell, "execution_count", 0) or 0, reserve=False)
        try:
            cellfunc.compile_cell(body, filename=filename, prefix=f"%%pymw {line}".rstrip() + "\n")
        except SyntaxError as exc:
            raise exc.with_traceback(None) from None
        except Exception:  # anything else is the magic's to report, in its order
            return


def run_cell(shell: Any, line: str, cell: str) -> Coroutine[Any, Any, Any]:
    """What a rewritten ``%%pymw`` cell awaits: the magic's coroutine.  The
    line is taken as written, as the blocking magic takes it (it is Python,
    not a shell line: no ``$name``/``{expr}`` expansion)."""
    __tracebackhide__ = True  # noqa: F841
    awaiter = _installed.get(id(shell))
    if awaiter is None:  # the extension was unloaded after the cell was transformed
        return _run_plain(shell, line, cell)
    return awaiter.magics.run_cell_async(line, cell)


async def _run_plain(shell: Any, line: str, cell: str) -> Any:
    return shell.run_cell_magic("pymw", line, cell)
