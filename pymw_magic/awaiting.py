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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Coroutine

if TYPE_CHECKING:
    from .magics import PymwMagics

__all__ = ["CellAwaiter", "run_cell"]

# What IPython's cell-magic transform produces for a %%pymw cell.
_CELL_CALL = "get_ipython().run_cell_magic('pymw', "
_AWAIT_CALL = "await __import__('pymw_magic').awaiting.run_cell(get_ipython(), "


class CellAwaiter:
    """Installed on a kernel's shell by ``%load_ext pymw_magic``: rewrites
    top-level ``%%pymw`` cells into an ``await`` of the magic."""

    def __init__(self, shell: Any, magics: PymwMagics):
        self.shell = shell
        self.magics = magics
        self._depth = 0  # cells being executed right now (nested runs > 1)

    @staticmethod
    def applies_to(shell: Any) -> bool:
        """A Jupyter kernel's shell (it has a kernel and an asyncio loop runner)."""
        return getattr(shell, "kernel", None) is not None and hasattr(shell, "input_transformers_post")

    def install(self) -> None:
        self.shell.input_transformers_post.append(self.transform)
        self.shell.events.register("pre_execute", self._entered)
        self.shell.events.register("post_execute", self._left)

    def uninstall(self) -> None:
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
        return (self._depth == 0 and bool(getattr(shell, "autoawait", False))
                and shell.loop_runner is _asyncio_runner)

    def transform(self, lines: list[str]) -> list[str]:
        if lines and lines[0].startswith(_CELL_CALL) and self._can_await():
            return [_AWAIT_CALL + lines[0][len(_CELL_CALL):]] + lines[1:]
        return lines


def run_cell(shell: Any, line: str, cell: str) -> Coroutine[Any, Any, Any]:
    """What a rewritten ``%%pymw`` cell awaits: the magic's coroutine, with
    the line expanded as IPython expands a magic's line (``$name``, ``{expr}``)."""
    __tracebackhide__ = True  # noqa: F841
    from .magics import loaded_magics
    magics = loaded_magics(shell)
    if magics is None:  # the extension was unloaded after the cell was transformed
        return _run_plain(shell, line, cell)
    return magics.run_cell_async(shell.var_expand(line, 1), cell)


async def _run_plain(shell: Any, line: str, cell: str) -> Any:
    return shell.run_cell_magic("pymw", line, cell)
