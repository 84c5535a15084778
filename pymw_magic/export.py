"""Exporting a notebook as a plain Python batch script.

This module owns the translation of a notebook's cells into a script that
runs with ``python SCRIPT.py`` — no IPython shell, no kernel — and under
``mpiexec``; what the script's calls do at run time is
:mod:`pymw_magic.script`'s.  ``pymw-magic export NOTEBOOK.ipynb`` and
``%pymw export`` both come here.

====================================  ===================================================
in the notebook                       in the script
====================================  ===================================================
``%%pymw`` cell                       a ``def`` made by the magic's own cell-to-function
                                      translation (:mod:`pymw_magic.cellfunc`; the
                                      cell's comments kept), named after ``--out`` or
                                      ``--name``, then ``pymw.map``/``starmap``/``run``
                                      binding the names the cell bound: ``--out VAR``
                                      the results (``--nowait``: the Job), else the
                                      value is printed as the cell's ``Out[N]``;
                                      ``_pymw_job`` when the notebook reads it; the
                                      job named as in the notebook (``cell-N``)
``%pymw use B --opt V``               ``pymw.use('B', opt=V)``: the script's master
``%pymw status|jobs|cancel|tune``     ``pymw.magic('status')``: the magic's own handler
``%pymw sweep ARGS``                  ``pymw.sweep(ARGS)``
``%pymw dashboard|help|export``       a comment: a script shows text progress bars
plain code                            kept as written, in order; a last expression
                                      (not ending in ``;``) printed as IPython shows it,
                                      and bound to ``_``, ``_N`` and ``Out[N]``
``!cmd``, ``%mkdir``-style aliases    ``pymw.system(...)``: as IPython's, a failing
                                      command prints its error and the script goes on
                                      (``_exit_code``); ``$name``/``{expr}`` expanded
``x = !cmd``                          ``pymw.getoutput(...)``: the lines of stdout and
                                      stderr, as IPython's ``getoutput``
``%%bash``, ``%%sh``                  ``subprocess.run(..., shell=True, check=True)``: a
                                      failure raises, as the cell magic's does
``%time S``, ``%%time``               S, the body: run plainly, untimed (a ``%%pymw``
                                      body: as any ``%%pymw`` cell)
``%%writefile [-a] F``                ``open(F).write(...)``
``%cd``, ``%env``, ``%pwd``, aliases  ``os.chdir``, ``os.environ``, ``os.getcwd``, the shell
``%load_ext``, ``%matplotlib``,       a comment: nothing to do in a script
``%config``, ``%timeit``, ``obj?``,
``%who``, ``%%html``, ...
anything else (``%run``, ``%pip``,    an :class:`ExportError` listing every such cell and
an extension's magics, top-level      line; with ``skip_unsupported`` the script has them
``await``, ``get_ipython()``)         commented out under a ``pymw export: SKIPPED`` warning
cell tagged ``raises-exception``      inside ``with pymw.keep_going():`` — the error is
                                      printed and the script goes on, as nbclient does
markdown and raw cells                comments
====================================  ===================================================

Magic lines are read by IPython's own input transformer, so what counts as
a magic, a shell escape or help is exactly what a kernel would run.  The
``%pymw``/``%%pymw`` options are checked by the magics' parser and
validation, so a notebook with a bad option does not export either; the
``%%pymw`` line is taken as written (Python, never ``$name``-expanded), as
the magic takes it.  Execution counts are those of a run from the top
(nbclient's: every non-empty code cell, in order): they number ``Out[N]``,
``_N`` and the default job names.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import keyword
import os
import re
import shlex
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import PymwError
from .magics import subcommand
from .options import (
    DEFAULT_BACKEND, OptionError, add_backend_arguments, backend_arguments, check_backend, parse_cell_line,
    parse_use, validate,
)
from .script import subcommands

__all__ = [
    "ExportError", "Exported", "Problem", "add_export_arguments", "export", "export_magic",
    "export_notebook", "kernel_notebook_path", "read_notebook", "run_export",
]

# IPython only: configuration, display and introspection.  At a statement's
# place they have nothing to do in a script (their value is never used).
_EXTENSION_MAGICS = frozenset({"load_ext", "reload_ext", "unload_ext"})
_IPYTHON_ONLY = frozenset({
    "matplotlib", "config", "autoreload", "aimport", "xmode", "pdb", "colors", "precision",
    "automagic", "autocall", "autoawait", "lsmagic", "magic", "quickref", "page", "who", "whos",
    "pinfo", "pinfo2", "pdoc", "pdef", "psource", "pfile", "psearch", "history",
})
_DISPLAY_CELL_MAGICS = frozenset({"html", "HTML", "javascript", "js", "latex", "markdown", "svg"})
_INSTALLERS = frozenset({"pip", "conda", "mamba", "micromamba", "uv"})
#: %pymw subcommands that only print: no value to show.
_PRINTING_SUBCOMMANDS = frozenset({"status", "jobs", "cancel"})
_RAISES_TAG = "raises-exception"


@dataclass(frozen=True)
class Problem:
    """A cell line the script cannot express: where, what, and why."""

    cell: int      # 1-based, counting every cell of the notebook
    line: int      # 1-based, in the cell
    source: str    # the line as written
    reason: str

    def __str__(self) -> str:
        return f"cell {self.cell}, line {self.line}: {self.source.strip()}\n      {self.reason}"


class ExportError(PymwError):
    """The notebook cannot be exported: not a notebook, a bad option, or
    cells with no plain-Python meaning (``problems``)."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class Exported:
    """An export's outcome: the script's text, the lines commented out
    (``skip_unsupported``), and where it was written (if it was)."""

    script: str
    skipped: list[Problem] = field(default_factory=list)
    path: Path | None = None


# --- reading a notebook ----------------------------------------------------------------

def read_notebook(path: str | os.PathLike) -> dict[str, Any]:
    """The notebook at ``path`` (nbformat 4 JSON); ExportError saying what
    is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file")
    if path.is_dir():
        raise ExportError(f"{path} is a directory, not a notebook (.ipynb file)")
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ExportError(f"{path} is not a notebook: it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not a notebook: it is not JSON ({exc.msg} at line "
                          f"{exc.lineno}); give the .ipynb file") from None
    if isinstance(nb, dict) and "worksheets" in nb:
        raise ExportError(f"{path} is an nbformat 3 notebook; convert it first: "
                          f"jupyter nbconvert --to notebook --nbformat 4 {shlex.quote(str(path))}")
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ExportError(f"{path} is not a notebook: JSON without a list of 'cells'")
    for number, cell in enumerate(nb["cells"], 1):
        problem = _cell_problem(cell)
        if problem is not None:
            raise ExportError(f"{path} is not a valid notebook: cell {number} {problem}; "
                              "save it again from Jupyter, or check it with nbformat's validator")
    meta = nb.get("metadata") or {}
    language = ((meta.get("kernelspec") or {}).get("language")
                or (meta.get("language_info") or {}).get("name") or "python")
    if str(language).lower() != "python":
        raise ExportError(f"{path} is a {language} notebook; only Python notebooks export to a script")
    return nb


_CELL_TYPES = ("code", "markdown", "raw")


def _cell_problem(cell: Any) -> str | None:
    """What makes ``cell`` no nbformat 4 cell, as far as the export reads it."""
    if not isinstance(cell, dict):
        return f"is a JSON {type(cell).__name__}, not an object with 'cell_type' and 'source'"
    kind = cell.get("cell_type")
    if kind not in _CELL_TYPES:
        return f"has cell_type {kind!r}; valid: {', '.join(_CELL_TYPES)}"
    source = cell.get("source", "")
    if not (isinstance(source, str) or (isinstance(source, list)
                                        and all(isinstance(line, str) for line in source))):
        return "has a 'source' that is neither text nor a list of lines"
    meta = cell.get("metadata", {})
    if not isinstance(meta, dict) or not isinstance(meta.get("tags", []), list):
        return "has 'metadata' that is not an object (with 'tags' a list)"
    return None


def _text(cell: Mapping[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _names_in(code: str) -> set[str]:
    """The identifiers ``code`` uses (strings and comments left out)."""
    try:
        return {tok.string for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                if tok.type == tokenize.NAME}
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return set(re.findall(r"[A-Za-z_]\w*", code))


def _literal(value: Any, raw: Any) -> str:
    """An option's value as Python source: the converted value when it is a
    plain literal, else its text (which the option converts at run time)."""
    if type(value) in (int, float, str, bool, type(None)):
        try:
            if ast.literal_eval(repr(value)) == value:
                return repr(value)
        except (ValueError, SyntaxError):  # nan, inf
            pass
    return repr(raw if isinstance(raw, str) else str(value))


def _text_literal(text: str) -> str:
    """``text`` as a readable string literal: triple-quoted when that is
    exact, else ``repr``."""
    if ("'''" in text or "\\" in text or text.endswith("'")
            or any(ch < " " and ch not in "\t\n" for ch in text)):
        return repr(text)
    return "'''\\\n" + text + "'''"


def _comment(text: str) -> str:
    return "\n".join(("# " + line).rstrip() for line in text.rstrip("\n").splitlines())


def _quiet(code: str) -> bool:
    """IPython shows no Out for a cell whose last token is ``;``."""
    last = None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.INDENT,
                                tokenize.DEDENT, tokenize.ENDMARKER):
                last = tok
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    return last is not None and last.type == tokenize.OP and last.string == ";"


def _ipython_call(node: ast.AST) -> tuple[str, list[str]] | None:
    """``get_ipython().METHOD('text', ...)`` (what IPython's transformer makes
    of a magic, ``!cmd`` or ``obj?``): the method and its arguments."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    owner = node.func.value
    if not (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
            and owner.func.id == "get_ipython" and not owner.args):
        return None
    if node.keywords or not all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args):
        return None
    return node.func.attr, [a.value for a in node.args]


def _cell_magic_of(code: str) -> tuple[str, str, str] | None:
    """(name, line, body) when ``code`` (a transformed cell) is a cell magic."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
        call = _ipython_call(tree.body[0].value)
        if call is not None and call[0] == "run_cell_magic" and len(call[1]) == 3:
            name, line, body = call[1]
            return name, line, body
    return None


# How a magic reads in the script.
@dataclass
class _Tr:
    code: str | None = None      # an expression (statements if ``statement``)
    statement: bool = False
    valued: bool = False         # shown as the cell's Out when it ends the cell
    comment: str | None = None   # dropped at a statement's place: why
    error: str | None = None     # no plain-Python meaning: why


class _Edits:
    """Replacements in a text by (line, byte column) spans, applied at once."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.spans: list[tuple[int, int, str]] = []

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode()[:col].decode(errors="replace"))

    def replace(self, node: ast.AST, text: str) -> None:
        self.spans.append((self.offset(node.lineno, node.col_offset),
                           self.offset(node.end_lineno, node.end_col_offset), text))

    def insert(self, lineno: int, col: int, text: str) -> None:
        at = self.offset(lineno, col)
        self.spans.append((at, at, text))

    def apply(self) -> str:
        text = self.text
        for start, end, new in sorted(self.spans, key=lambda s: (s[0], s[1]), reverse=True):
            text = text[:start] + new + text[end:]
        return text


class _Exporter:
    """One notebook's translation (see the module docstring)."""

    def __init__(self, nb: dict[str, Any], *, skip_unsupported: bool):
        from IPython.core.inputtransformer2 import TransformerManager

        self.transform = TransformerManager().transform_cell
        self.subcommands = subcommands()
        self.cells = nb["cells"]
        self.skip = skip_unsupported
        self.problems: list[Problem] = []
        self.skipped: list[Problem] = []
        self.future: list[str] = []
        self.modules: dict[str, str] = {}       # module -> the name the script imports it as
        self.loads: set[str] = set()
        self.binds: set[str] = set()
        self.backend_now = DEFAULT_BACKEND      # the default backend at this point of the notebook
        self.first_backend: str | None = None
        self.plain_imports: set[str] = set()
        self.words: set[str] = set()
        for cell in self.cells:
            if cell.get("cell_type") == "code":
                code = self.transform(_text(cell))
                self.words |= _names_in(code)
                self.plain_imports |= set(re.findall(r"^\s*import\s+(\w+)\s*$", code, re.M))
                magic = _cell_magic_of(code)
                while magic is not None:  # a cell magic's line and body are code too
                    body = self.transform(magic[2])  # (a %%pymw body under %%time: its own magic)
                    self.words |= _names_in(body) | _names_in(magic[1])
                    magic = _cell_magic_of(body)
        self.used: set[str] = set()
        self.pymw = self._fresh("pymw")
        self.runtime_class = self._fresh("Runtime")
        self.unset = self._fresh("UNSET")  # cellfunc.UNSET, imported when a cell needs it
        self.needs_unset = False
        self.reads_job = "_pymw_job" in self.words
        self.count = 0  # the execution count (In[N]) of the cell being translated

    def _fresh(self, base: str) -> str:
        """``base``, or ``base_2``, ... : a name the notebook does not use."""
        name, k = base, 2
        while name in self.words or name in self.used or keyword.iskeyword(name):
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def _module(self, module: str) -> str:
        """The name the script imports ``module`` as (an alias only when the
        notebook uses that name for something else)."""
        if module not in self.modules:
            clash = module in self.words and module not in self.plain_imports
            self.modules[module] = self._fresh("_pymw_" + module) if clash else module
        return self.modules[module]

    # -- problems --
    def _problem(self, cell: int, line: int, source: str, reason: str) -> bool:
        """Record a problem; True when it is to be commented out instead."""
        lines = source.splitlines() or [""]
        text = lines[line - 1] if 0 < line <= len(lines) else lines[0]
        problem = Problem(cell, line, text, reason)
        (self.skipped if self.skip else self.problems).append(problem)
        return self.skip

    @staticmethod
    def _skipped_note(reason: str) -> str:
        return f"pymw export: SKIPPED ({reason}); this did not run"

    # -- cells --
    def cells_text(self) -> list[str]:
        chunks = []
        for number, cell in enumerate(self.cells, 1):
            kind, text = cell.get("cell_type"), _text(cell)
            if not text.strip():
                continue
            if kind == "markdown":
                chunks.append(f"# %% [markdown] cell {number}\n{_comment(text)}")
            elif kind == "raw":
                chunks.append(f"# %% [raw] cell {number}\n{_comment(text)}")
            elif kind == "code":
                self.count += 1  # as nbclient runs it: every non-empty code cell, in order
                tags = set((cell.get("metadata") or {}).get("tags") or ())
                body = self._code_cell(number, text, tags)
                if body.strip():
                    chunks.append(body.rstrip("\n"))
        return chunks

    def _code_cell(self, number: int, source: str, tags: set[str]) -> str:
        # IPython drops a cell's leading blank lines before anything else.
        lines = source.splitlines()
        offset = next((i for i, line in enumerate(lines) if line.strip()), 0)
        code = self.transform(source)
        magic = _cell_magic_of(code)
        if magic is not None:
            name, line, body = magic
            return self._cell_magic(number, offset, source, name, line, body, tags)
        return f"# %% cell {number}\n" + self._plain(number, offset, source, code, tags)

    def _commented_cell(self, number: int, source: str, note: str) -> str:
        return f"# %% cell {number}\n# {note}:\n{_comment(source)}\n"

    def _plain(self, number: int, offset: int, source: str, code: str, tags: set[str]) -> str:
        """Plain code: kept as written, magics translated, the last value shown."""
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            reason = f"not valid Python: {exc.msg}"
            if self._problem(number, (exc.lineno or 1) + offset, source, reason):
                return f"# {self._skipped_note(reason)}:\n{_comment(code)}\n"
            return ""
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        edits = _Edits(code)
        last = tree.body[-1] if tree.body else None
        quiet = _quiet(code)
        translated: set[int] = set()

        def statement_of(node: ast.AST) -> ast.stmt:
            while not isinstance(node, ast.stmt):
                node = parents[node]
            return node  # type: ignore[return-value]

        def drop(stmt: ast.stmt, note: str) -> None:
            """Comment ``stmt`` out, its magics as written (``pass`` keeps an
            emptied block valid)."""
            text = ast.get_source_segment(code, stmt) or ""
            for node in ast.walk(stmt):
                call = _ipython_call(node)
                if call is not None:
                    text = text.replace(ast.get_source_segment(code, node) or "\0", _magic_text(*call))
            commented = "\n".join("# " + line for line in text.splitlines()) + f"  # {note}"
            inside = parents.get(stmt) is not tree
            pad = " " * stmt.col_offset
            edits.replace(stmt, ("pass\n" + pad if inside else "") + commented.replace("\n", "\n" + pad))

        for node in ast.walk(tree):
            call = _ipython_call(node)
            if call is None:
                continue
            translated.add(id(node.func.value.func))  # type: ignore[attr-defined]
            stmt = statement_of(node)
            whole = isinstance(parents.get(node), ast.Expr) and parents[node] is stmt
            line = node.lineno + offset
            tr = self._translate(*call)
            if tr.error is None and not whole and (tr.statement or tr.code is None):
                tr = _Tr(error="a magic used for its value here, which has no plain-Python equivalent")
            if tr.error is not None:
                if self._problem(number, line, source, tr.error):
                    drop(stmt, self._skipped_note(tr.error))
                continue
            if tr.comment is not None:  # whole statement: nothing to do in a script
                drop(stmt, f"pymw export: {tr.comment}")
                continue
            text = tr.code or ""
            if whole and stmt is last and tr.valued and not tr.statement and not quiet:
                text = f"{self.pymw}.show({text}, {self.count})"
            edits.replace(node, text.replace("\n", "\n" + " " * stmt.col_offset))

        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "get_ipython" and id(node) not in translated:
                reason = "get_ipython(): a script has no IPython shell"
                if self._problem(number, node.lineno + offset, source, reason):
                    drop(statement_of(node), self._skipped_note(reason))
        if (isinstance(last, ast.Expr) and not quiet and _ipython_call(last.value) is None
                and not _returns_none(last.value)):
            # A bare tuple (``a, b``) needs its own parentheses as an argument.
            bare = isinstance(last.value, ast.Tuple) and not (
                ast.get_source_segment(code, last.value) or "").startswith("(")
            edits.insert(last.lineno, last.col_offset, f"{self.pymw}.show(" + "(" * bare)
            edits.insert(last.end_lineno, last.end_col_offset, ")" * bare + f", {self.count})")
        for stmt in tree.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                self.future.append(ast.get_source_segment(code, stmt) or "")
                edits.replace(stmt, "# (from __future__ import: moved to the top of the script)")
        text = edits.apply()
        try:
            result = compile(text, f"<cell {number}>", "exec", dont_inherit=True,
                             flags=ast.PyCF_ONLY_AST)
            compile(result, f"<cell {number}>", "exec", dont_inherit=True)
        except SyntaxError as exc:
            reason = (f"{exc.msg} (IPython's top-level await): wrap it in asyncio.run(...)"
                      if "await" in str(exc.msg) else f"not valid Python in a script: {exc.msg}")
            if self._problem(number, (exc.lineno or 1) + offset, source, reason):
                return f"# {self._skipped_note(reason)}:\n{_comment(text)}\n"
            return ""
        self._note_names(result)
        if _RAISES_TAG in tags:
            from .cellfunc import indent
            text = (f"# The notebook expects this cell to raise (tag {_RAISES_TAG}): the error is "
                    f"printed and the script goes on.\nwith {self.pymw}.keep_going():\n{indent(text)}")
        return text

    def _note_names(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (self.loads if isinstance(node.ctx, ast.Load) else self.binds).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.binds.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self.binds.update((a.asname or a.name).split(".")[0] for a in node.names)

    # -- magics --
    def _translate(self, method: str, args: list[str]) -> _Tr:
        if method == "run_line_magic" and len(args) == 2:
            return self._line_magic(*args)
        if method == "system" and len(args) == 1:
            return self._shell(args[0], capture=False)
        if method == "getoutput" and len(args) == 1:
            return self._shell(args[0], capture=True)
        return _Tr(error=f"get_ipython().{method}(...): no plain-Python meaning")

    def _shell(self, command: str, *, capture: bool) -> _Tr:
        """``!cmd`` (``x = !cmd`` when ``capture``): the Runtime's
        IPython-like ``system``/``getoutput``, not ``check=True``: the
        notebook prints a failure and goes on, so the script does too."""
        arg = repr(command)
        if "$" in command or "{" in command:  # IPython expands names in !cmd at run time
            arg = f"{self.pymw}.expand({arg})"
        if capture:
            return _Tr(code=f"{self.pymw}.getoutput({arg})", valued=True)
        return _Tr(code=f"{self.pymw}.system({arg})")

    def _line_magic(self, name: str, line: str) -> _Tr:
        if name == "pymw":
            return self._pymw_line(line)
        if name in _EXTENSION_MAGICS:
            return _Tr(comment="IPython extensions are not loaded in a script (it imports what it uses)")
        if name in _IPYTHON_ONLY:
            return _Tr(comment="IPython display, configuration or introspection: nothing to do in a script")
        if name == "timeit":
            return _Tr(comment="timing only: the script does not repeat the statement")
        if name == "time":
            try:
                ast.parse(line, mode="eval")
                return _Tr(code=line, valued=True)
            except SyntaxError:
                pass
            try:
                ast.parse(line)
                return _Tr(code=line, statement=True)
            except SyntaxError as exc:
                return _Tr(error=f"%time of invalid Python: {exc.msg}")
        if name in ("system", "sx"):
            return self._shell(line, capture=name == "sx")
        if name == "cd":
            words = shlex.split(line)
            if len(words) > 1 or (words and words[0].startswith("-")):
                return _Tr(error="%cd with options or bookmarks: write os.chdir(PATH) instead")
            os_ = self._module("os")
            where = repr(words[0]) if words else "'~'"
            return _Tr(code=f"{os_}.chdir({os_}.path.expanduser({where}))")
        if name == "pwd":
            return _Tr(code=f"{self._module('os')}.getcwd()", valued=True)
        if name == "env":
            return self._env(line)
        if name in _INSTALLERS:
            return _Tr(error=f"%{name} installs packages: install them in the environment that "
                             "runs the script instead")
        aliases = _shell_aliases()
        if name in aliases:
            return self._shell(_alias_command(aliases[name], line), capture=False)
        if name == "run":
            return _Tr(error="%run executes another file in the notebook: import it, or paste its code")
        return _Tr(error=f"%{name} is an IPython or extension magic with no plain-Python meaning")

    def _env(self, line: str) -> _Tr:
        os_ = self._module("os")
        text = line.strip()
        match = re.fullmatch(r"(\w+)\s*[= ]\s*(.*)", text)
        if match:
            return _Tr(code=f"{os_}.environ[{match.group(1)!r}] = {match.group(2)!r}", statement=True)
        if re.fullmatch(r"\w+", text):
            return _Tr(code=f"{os_}.environ[{text!r}]", valued=True)
        if not text:
            return _Tr(code=f"dict({os_}.environ)", valued=True)
        return _Tr(error="%env with this form: write os.environ[NAME] = VALUE instead")

    def _pymw_line(self, line: str) -> _Tr:
        sub, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if sub == "use":
            try:
                backend, options, parsed = parse_use(rest, defer_names=True)
            except OptionError as exc:
                return _Tr(error=f"%pymw use: {exc}")
            self.backend_now = backend
            self.first_backend = self.first_backend or backend
            args = [repr(backend)] + [f"{k}={_literal(v, parsed.options.get(k))}" for k, v in options.items()]
            return _Tr(code=f"{self.pymw}.use({', '.join(args)})")
        if sub in ("", "help"):
            return _Tr(comment="%pymw help: nothing to show in a script")
        if sub == "dashboard":
            return _Tr(comment="no dashboard in a script: each job shows a text progress bar on stderr")
        if sub == "export":
            return _Tr(comment="this script is the export")
        if sub == "sweep":
            try:
                ast.parse(f"f({rest})", mode="eval")
            except SyntaxError:
                return _Tr(error="%pymw sweep expects FN, over=EXPR, NAME=CONTROL, ... (Python arguments)")
            return _Tr(code=f"{self.pymw}.sweep({rest})", valued=True)
        if sub in self.subcommands:
            return _Tr(code=f"{self.pymw}.magic({line.strip()!r})", valued=sub not in _PRINTING_SUBCOMMANDS)
        return _Tr(error=f"unknown %pymw subcommand {sub!r}; valid: {', '.join(self.subcommands)}")

    def _cell_magic(self, number: int, offset: int, source: str, name: str, line: str, body: str,
                    tags: set[str]) -> str:
        head = f"%%{name} {line}".rstrip()
        if name == "pymw":
            return self._pymw_cell(number, offset, source, line, body, tags)
        if name == "time" or (name == "capture" and not line.strip()):
            what = "untimed" if name == "time" else "its output not captured"
            inner = self.transform(body)
            nested = _cell_magic_of(inner)
            if nested is not None:  # %%time over %%pymw: the body is a cell magic of its own
                code = self._cell_magic(number, offset + 1, source, *nested, tags)
                return f"# %% cell {number}: {head} (the body, a cell magic, runs {what})\n{code}" if code else ""
            code = self._plain(number, offset + 1, source, inner, tags)
            return f"# %% cell {number}: {head} (the body runs as plain code, {what})\n{code}"
        if name == "timeit":
            return self._commented_cell(number, source, "pymw export: timing only, the script does not run it")
        if name in _DISPLAY_CELL_MAGICS:
            return self._commented_cell(number, source, f"pymw export: %%{name} only displays; "
                                                        "nothing to do in a script")
        if name in ("bash", "sh") and not line.strip():
            shell = ", executable='bash'" if name == "bash" else ""
            run = f"{self._module('subprocess')}.run"
            return f"# %% cell {number}: {head}\n{run}({_text_literal(body)}, shell=True, check=True{shell})\n"
        if name == "writefile":
            words = shlex.split(line)
            append = "-a" in words or "--append" in words
            files = [w for w in words if w not in ("-a", "--append")]
            if len(files) == 1 and not files[0].startswith("-"):
                mode = "a" if append else "w"
                return (f"# %% cell {number}: {head}\n"
                        f"with open({files[0]!r}, {mode!r}) as _pymw_file:\n"
                        f"    _pymw_file.write({_text_literal(body)})\n")
        reason = f"%%{name} is a cell magic with no plain-Python meaning"
        if self._problem(number, offset + 1, source, reason):
            return self._commented_cell(number, source, self._skipped_note(reason))
        return ""

    def _pymw_cell(self, number: int, offset: int, source: str, line: str, body: str,
                   tags: set[str]) -> str:
        """A ``%%pymw`` cell: its function and the call that binds its names."""
        from . import cellfunc

        try:
            # Names of the notebook's objects (--policy pick) are resolved when the script runs.
            parsed, asked, master_kw, cell_kw = parse_cell_line(line, default_backend=self.backend_now,
                                                                defer_names=True)
            spec = cellfunc.parse_map(cell_kw["map"]) if "map" in cell_kw else None
        except ValueError as exc:  # an OptionError, or parse_map's
            reason = f"%%pymw: {exc}"
            if self._problem(number, offset + 1, source, reason):
                return self._commented_cell(number, source, self._skipped_note(reason))
            return ""
        try:
            compiled = cellfunc.compile_cell(body, params=spec.names if spec else (),
                                             filename=f"<cell {number}>", prefix=f"%%pymw {line}\n")
        except SyntaxError as exc:
            reason = f"not valid Python: {exc.msg}"
            if self._problem(number, (exc.lineno or 1) + offset, source, reason):
                return self._commented_cell(number, source, self._skipped_note(reason))
            return ""
        out, nowait = cell_kw.get("out"), bool(cell_kw.get("nowait"))
        fn = self._task_name(out, cell_kw.get("name"), number)
        expects_error = _RAISES_TAG in tags
        # The job's name is the notebook's: --name, else the magic's cell-N.
        kwargs = [f"name={cell_kw.get('name') or f'cell-{self.count}'!r}"]
        if cell_kw.get("chunksize"):
            kwargs.append(f"chunksize={cell_kw['chunksize']!r}")
        if asked:
            kwargs.append(f"backend={asked!r}")
        kwargs += [f"{k}={_literal(v, parsed.options.get(k))}" for k, v in master_kw.items()]
        target = out or ("_pymw_job" if nowait else None)
        if nowait:
            kwargs.append("nowait=True")
        elif not out:
            kwargs.append(f"show={self.count}")  # the value is the notebook's Out[N]
        elif expects_error:
            kwargs.append("return_exceptions=True")
        extra = "".join(", " + k for k in kwargs)
        if spec is None:
            call = f"{self.pymw}.run({fn}{extra})"
        elif spec.names == (spec.target,):
            call = f"{self.pymw}.map({fn}, {_argument(spec.iterable)}{extra})"
        else:
            args = ", ".join(spec.names) + ("," if len(spec.names) == 1 else "")
            items = f"[({args}) for {spec.target} in {_argument(spec.iterable)}]"
            call = f"{self.pymw}.starmap({fn}, {items}{extra})"
        statement = f"{target} = {call}" if target else call
        if expects_error:
            check = (f"\n    {self.pymw}.check()  # the first failure, raised as in the notebook"
                     + (f"; {out} keeps every result" if out and not nowait else "")
                     if out and not nowait else "")
            statement = (f"# The notebook expects this cell to raise (tag {_RAISES_TAG}): the error "
                         f"is printed and the script goes on.\nwith {self.pymw}.keep_going():\n"
                         f"    {statement}{check}")
        if self.reads_job and target != "_pymw_job":
            statement += f"\n_pymw_job = {self.pymw}.last_job"
        self._note_names(ast.parse(compiled.source))
        self.binds.add(fn)
        self.needs_unset = self.needs_unset or bool(compiled.maybe_unset)
        return (f"# %% cell {number}: %%pymw {line}".rstrip() + "\n"
                f"{compiled.to_source(fn, unset=self.unset)}\n\n{statement}\n")

    def _task_name(self, out: str | None, name: str | None, number: int) -> str:
        if out:
            base = out
        elif name:
            base = re.sub(r"\W+", "_", name).strip("_") or f"cell{number}"
            base = base if base[0].isalpha() or base[0] == "_" else "job_" + base
        else:
            base = f"cell{number}"
        return self._fresh(base + "_task")


def _argument(expr: str) -> str:
    """A ``--map`` EXPR as a call argument or a ``for`` iterable: in
    parentheses unless it is one simple term (a bare tuple or a conditional
    would mean something else there)."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:  # pragma: no cover - parse_map accepted it
        return f"({expr})"
    simple = (ast.Name, ast.Call, ast.Attribute, ast.Subscript, ast.List, ast.ListComp, ast.Set,
              ast.SetComp, ast.Dict, ast.DictComp, ast.Constant)
    if isinstance(node, simple) or (isinstance(node, (ast.Tuple, ast.GeneratorExp)) and expr.startswith("(")):
        return expr
    return f"({expr})"


def _magic_text(method: str, args: list[str]) -> str:
    """How a ``get_ipython()`` call was written in the notebook."""
    if method == "run_line_magic" and len(args) == 2:
        return f"%{args[0]} {args[1]}".rstrip()
    if method == "system" and args:
        return "!" + args[0]
    if method == "getoutput" and args:
        return "!!" + args[0]
    return f"get_ipython().{method}(...)"


def _returns_none(expr: ast.expr) -> bool:
    """Calls that return None by convention: not worth a ``pymw.show``."""
    return (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)
            and expr.func.id in ("print", "display"))


def _shell_aliases() -> dict[str, str]:
    """IPython's default shell aliases (``%ls``, ``%mkdir``, ...)."""
    from IPython.core.alias import default_aliases
    return dict(default_aliases())


def _alias_command(command: str, line: str) -> str:
    """An alias's command line, expanded as IPython's alias magic does."""
    if "%l" in command:
        return command.replace("%l", line)
    if "%s" in command:
        args = line.split(None, command.count("%s"))
        return command % tuple(args[:command.count("%s")]) + " ".join(args[command.count("%s"):])
    return f"{command} {line}".rstrip()


# --- the script --------------------------------------------------------------------------

def export_notebook(notebook: str | os.PathLike, *, backend: str | None = None,
                    options: Mapping[str, Any] | None = None, skip_unsupported: bool = False,
                    label: str | None = None, script_name: str | None = None) -> Exported:
    """``notebook`` as the text of a script (nothing is written).

    ``backend``/``options`` (text, as on a command line, or values) become
    the script's defaults in place of the notebook's ``%pymw use``; the
    script's own command line overrides them again.  Cells with no
    plain-Python meaning raise :class:`ExportError` listing them all,
    unless ``skip_unsupported``, which comments them out (listed in
    ``Exported.skipped``).  ``label`` is how the header names the notebook,
    ``script_name`` the script (default: the notebook's name with ``.py``).
    """
    path = Path(notebook)
    return _export_read(read_notebook(path), path, backend=backend, options=options,
                        skip_unsupported=skip_unsupported, label=label, script_name=script_name)


def _export_read(nb: dict[str, Any], path: Path, *, backend: str | None,
                 options: Mapping[str, Any] | None, skip_unsupported: bool, label: str | None,
                 script_name: str | None) -> Exported:
    """:func:`export_notebook` of the notebook ``nb`` read from ``path``."""
    from .version import __version__

    exporter = _Exporter(nb, skip_unsupported=skip_unsupported)
    chunks = exporter.cells_text()
    if exporter.problems:
        listing = "\n".join(f"  {p}" for p in exporter.problems)
        raise ExportError(
            f"{path} cannot be exported as it is: {len(exporter.problems)} cell line(s) have no "
            f"plain-Python meaning or are invalid:\n{listing}\nRewrite them in Python, or export "
            "with --skip-unsupported to comment them out (the script marks each with a warning).",
            exporter.problems)
    default = exporter.first_backend or exporter.backend_now
    try:
        if backend is not None:
            check_backend(backend)
        chosen, _ = validate(dict(options or {}), backend=backend or default, cell=False, defer_names=True)
    except OptionError as exc:
        raise ExportError(f"export options: {str(exc).replace(' for %pymw use', '')}") from None

    name = label or path.name
    script = script_name or path.with_suffix(".py").name
    runtime_args = ["globals()", f"notebook={name!r}", f"default_backend={default!r}"]
    if backend is not None:
        runtime_args.append(f"backend={backend!r}")
    runtime_args += [f"{k}={_literal(v, (options or {}).get(k))}" for k, v in chosen.items()]
    if backend or chosen:
        how = f"on {backend or default!r}" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in chosen.items()) + " (chosen at export)"
    else:
        how = f"on the notebook's backend ({default!r})"
    title = next((line.lstrip("#").strip() for cell in exporter.cells if cell.get("cell_type") == "markdown"
                  for line in _text(cell).splitlines() if line.startswith("# ")), path.stem)
    title = re.sub(r'["\\]', "", title)
    warning = ""
    if exporter.skipped:
        warning = (f"\nWARNING: {len(exporter.skipped)} cell line(s) with no plain-Python meaning are "
                   "commented out here (search for\n'pymw export: SKIPPED'): the results may differ "
                   "from the notebook's.\n")
    usage = [(f"python {script}", how),
             (f"python {script} --backend mpi --workers 8", "another backend, other options"),
             (f"mpiexec -n 9 python {script} --backend mpi", "rank 0 the master, ranks 1..8 workers"),
             (f"python {script} --help", "every backend and option")]
    width = max(len(command) for command, _ in usage)
    runs = "\n".join(f"    {command:<{width}}  # {what}" for command, what in usage)
    header = f'''#!/usr/bin/env python3
"""{title}: a batch script made from a notebook.

Notebook: {name}
Exported by pymw-magic {__version__} (`pymw-magic export` or `%pymw export`);
change the notebook and export it again rather than editing both.
{warning}
Run:
{runs}

Each %%pymw cell is a function and a pymw.map/starmap/run call that binds the
names the cell bound; the plain cells follow in order, and a cell's last value
is printed as the notebook showed it (pymw_magic.script says more).
"""'''
    parts = [header]
    if exporter.future:
        parts.append("\n".join(dict.fromkeys(exporter.future)))
    imports = [f"import {m}" if alias == m else f"import {m} as {alias}"
               for m, alias in sorted(exporter.modules.items())]
    if "display" in exporter.loads and "display" not in exporter.binds:
        imports.append("from IPython.display import display  # the notebook's display()")
    if exporter.needs_unset:
        imports.append("from pymw_magic.cellfunc import UNSET" + (
            f" as {exporter.unset}" if exporter.unset != "UNSET" else "")
            + "  # a name a cell reads before it assigns it, not defined before the cell")
    runtime_import = ("from pymw_magic.script import Runtime" if exporter.runtime_class == "Runtime"
                      else f"from pymw_magic.script import Runtime as {exporter.runtime_class}")
    parts.append("\n".join(imports + [runtime_import]) if imports else runtime_import)
    parts.append("# The master's backend and options: the notebook's, unless the command line says\n"
                 "# otherwise. Under mpiexec, ranks 1..N become workers here and go no further.\n"
                 f"{exporter.pymw} = {exporter.runtime_class}({', '.join(runtime_args)})")
    parts.extend(chunks)
    parts.append(f"# %% end\n{exporter.pymw}.close()  # waits for jobs still running, stops the workers")
    text = "\n\n\n".join(parts) + "\n"
    return Exported(script=text, skipped=exporter.skipped)


def export(notebook: str | os.PathLike, output: str | os.PathLike | None = None, *,
           backend: str | None = None, options: Mapping[str, Any] | None = None,
           skip_unsupported: bool = False) -> Exported:
    """Export ``notebook`` to ``output`` (default: beside it, ``.py``; ``-``
    for stdout).  See :func:`export_notebook`."""
    path = Path(notebook)
    nb = read_notebook(path)  # first: "not a notebook" says more than anything about the output
    to_stdout = str(output) == "-"
    target = None if to_stdout else Path(output) if output is not None else path.with_suffix(".py")
    if target is not None:
        if target.suffix == ".ipynb" or (target.exists() and target.resolve() == path.resolve()):
            raise ExportError(f"refusing to write the script over a notebook ({target}); give -o SCRIPT.py")
        if target.is_dir():
            raise ExportError(f"cannot write the script to {target}: it is a directory; "
                              "give -o DIRECTORY/SCRIPT.py")
        if not target.parent.is_dir():  # a typo in -o should not make directories
            raise ExportError(f"cannot write the script to {target}: the directory {target.parent} "
                              "does not exist; create it first, or give another -o")
        label = os.path.relpath(path.resolve(), target.resolve().parent)
        if label.startswith(os.pardir + os.sep + os.pardir):  # far away: say where it is
            label = str(path.resolve())
    else:
        label = str(path)
    result = _export_read(nb, path, backend=backend, options=options, skip_unsupported=skip_unsupported,
                          label=label, script_name=target.name if target is not None else None)
    if target is None:
        sys.stdout.write(result.script)
        return result
    try:
        target.write_text(result.script, encoding="utf-8")
        mode = target.stat().st_mode
        target.chmod(mode | ((mode & 0o444) >> 2))  # executable where readable: it has a #! line
    except OSError as exc:
        raise ExportError(f"cannot write the script to {target}: {exc.strerror or exc}") from None
    result.path = target
    return result


# --- the command line and the magic ------------------------------------------------------

class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting (for ``%pymw export``)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _ArgumentError(message)


def add_export_arguments(parser: argparse.ArgumentParser, *, notebook_required: bool = True) -> None:
    """The arguments of ``pymw-magic export`` and ``%pymw export``."""
    parser.add_argument("notebook", metavar="NOTEBOOK.ipynb", nargs=None if notebook_required else "?",
                        help="the notebook to export" + ("" if notebook_required else
                                                         " (default: this kernel's notebook)"))
    parser.add_argument("-o", "--output", metavar="SCRIPT.py",
                        help="where to write the script (default: beside the notebook, .py; - for stdout)")
    parser.add_argument("--skip-unsupported", action="store_true",
                        help="comment out magics with no plain-Python meaning (with a warning in "
                             "the script) instead of failing")
    add_backend_arguments(parser)


def _report(result: Exported, notebook: Path, prefix: str) -> None:
    for problem in result.skipped:
        print(f"{prefix}: warning: skipped {problem}", file=sys.stderr)
    if result.path is not None:
        print(f"{prefix}: wrote {result.path} from {notebook}"
              + (f" ({len(result.skipped)} line(s) skipped)" if result.skipped else ""), file=sys.stderr)


def run_export(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``pymw-magic export ...`` (parsed by ``parser``): 0 when written, 1
    when the notebook cannot be exported."""
    backend, options = backend_arguments(ns)
    try:
        result = export(ns.notebook, ns.output, backend=backend, options=options,
                        skip_unsupported=ns.skip_unsupported)
    except ExportError as exc:
        print(f"pymw-magic export: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # what the checks above did not foresee: still one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"pymw-magic export: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    _report(result, Path(ns.notebook), "pymw-magic export")
    return 0


def kernel_notebook_path(namespace: Mapping[str, Any]) -> Path:
    """The notebook this kernel runs, where the front end tells it: VS Code's
    ``__vsc_ipynb_file__``, or jupyter-server's ``JPY_SESSION_NAME`` (which
    ipykernel also puts in ``__session__``)."""
    candidates = [namespace.get("__vsc_ipynb_file__"), namespace.get("__session__"),
                  os.environ.get("JPY_SESSION_NAME")]
    for candidate in candidates:
        if not isinstance(candidate, str) or not candidate.endswith(".ipynb"):
            continue
        path = Path(candidate).expanduser()
        for where in (path, Path.cwd() / path.name):
            if where.is_file():
                return where
    raise ExportError("%pymw export: cannot tell which notebook this kernel runs (the front end "
                      "set neither __vsc_ipynb_file__ nor JPY_SESSION_NAME); give its path: "
                      "%pymw export NOTEBOOK.ipynb -o SCRIPT.py")


def export_magic(namespace: Mapping[str, Any], args: str) -> Exported:
    """``%pymw export [NOTEBOOK.ipynb] [-o SCRIPT.py] [options]``: export
    the notebook as last saved (this kernel's, unless named)."""
    parser = _Parser(prog="%pymw export", add_help=False, allow_abbrev=False)
    add_export_arguments(parser, notebook_required=False)
    try:
        ns = parser.parse_args(shlex.split(args))
    except (_ArgumentError, ValueError) as exc:
        raise ExportError(f"%pymw export: {exc}\nusage: {parser.format_usage().partition('usage: ')[2]}") from None
    notebook = Path(ns.notebook) if ns.notebook else kernel_notebook_path(namespace)
    backend, options = backend_arguments(ns)
    result = export(notebook, ns.output, backend=backend, options=options,
                    skip_unsupported=ns.skip_unsupported)
    for problem in result.skipped:
        print(f"pymw: warning: skipped {problem}")
    if result.path is not None:
        print(f"pymw: wrote {result.path} from {notebook} (the notebook as last saved)")
    return result


@subcommand("export", "%pymw export [NOTEBOOK.ipynb] [-o SCRIPT.py] [--backend B] [options] "
            "[--skip-unsupported]",
            "write this notebook (as last saved) as a plain Python script: python SCRIPT.py")
def export_subcommand(magics: Any, args: str) -> None:
    """``%pymw export ...``: registered here, so the magics need not import
    the exporter (``pymw_magic.load_ipython_extension`` imports this module)."""
    from IPython.core.error import UsageError
    try:
        export_magic(magics.shell.user_ns, args)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
