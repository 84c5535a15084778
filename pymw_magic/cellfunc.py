"""Turning a notebook cell's source into a task function.

This module owns the one translation the notebook surface rests on: a cell
body (what follows a ``%%pymw`` line) becomes an ordinary Python function
that a worker can run.  The rules are those of a notebook cell:

* names the cell *reads* and does not assign are taken from the notebook's
  namespace **by value, when the function is bound** (at submit time) — the
  function's globals hold only those names, never the live namespace;
* names the cell *assigns* are locals of the task; one it may read before
  assigning (``data = data * 2``) starts with the notebook's value, as it
  would in the notebook, and the assignment still stays in the task;
* the value of the cell's last expression is the task's result (like
  ``Out[N]``); a cell ending in a statement returns ``None``;
* ``--map`` targets (``x``, ``a, b``, ``(i, (j, k))``) become the function's
  parameters: :class:`MapSpec` unpacks each item of the iterable in the
  master, so a bad item is reported before any task starts;
* ``from M import *`` is refused with a SyntaxError saying to import the
  names explicitly: Python allows it at module level only, and the cell's
  body is a function.

Line numbers are those of the cell: the source is compiled under a filename
such as ``<pymw-cell-7>`` with the lines that precede the body (the
``%%pymw`` line) counted, and the text is registered in :mod:`linecache` —
in the master, and in each worker when the function is unpickled there — so
both local and remote tracebacks show the cell's own lines.

No IPython here: the notebook exporter reuses this module in plain Python.
"""

from __future__ import annotations

import ast
import builtins
import dis
import inspect
import io
import keyword
import linecache
import tokenize
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "BoundCell", "CellFunction", "MapError", "MapSpec", "UNSET", "compile_cell", "indent", "parse_map",
    "register_source", "with_class_reads",
]

#: The name tracebacks show for the cell's own frame.
CELL_FUNCTION_NAME = "<cell>"
_DEF_NAME = "_pymw_cell"  # placeholder identifier, renamed to CELL_FUNCTION_NAME

# Where a builtin's value comes from when it is a *real* builtin, present on
# every worker.  IPython adds ``display``/``get_ipython`` to the builtins
# module of the kernel only; those must be captured like notebook names.
_STANDARD_BUILTIN_MODULES = frozenset({"builtins", "_sitebuiltins"})
# Globals every cell function has; class bodies read ``__name__``.
_BASE_GLOBAL_NAMES = frozenset({"__name__", "__builtins__"})


class _Unset:
    """The type of :data:`UNSET` (one instance; pickled by reference)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"  # a worker gets this module's own UNSET, so ``is`` holds there too


#: The start value a plain ``def`` made by :meth:`CellFunction.to_source`
#: gets for a name the cell reads before assigning when the module does not
#: define it; the function then unbinds it, as :meth:`CellFunction.bind`
#: leaves such a name unbound.
UNSET = _Unset()


def register_source(filename: str, text: str) -> None:
    """Make ``text`` the source :mod:`linecache` returns for ``filename``.

    ``mtime=None`` tells :func:`linecache.checkcache` to keep the entry (the
    same trick IPython uses for its ``<ipython-input-…>`` cells).
    """
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[filename] = (len(text), None, lines, filename)


class BoundCell:
    """A cell bound to its captured values: what :meth:`CellFunction.bind`
    returns and what a master sends.  Calling it runs the cell.

    In the master it wraps the plain function (``function``) and forwards
    the function attributes (``__code__``, ``__globals__``, …) so payload
    diagnostics see through it.  Pickled, it becomes the plain function
    again: cloudpickle sends that function by value (its module is
    ``__main__``) but renames every code object's file to
    ``<dynamic-code>``; unpickling through :func:`_restore_cell` puts the
    cell's filename back and registers its text in the worker's
    :mod:`linecache`, so remote tracebacks name the cell and show its lines.
    """

    __slots__ = ("function", "filename", "text")

    def __init__(self, function: types.FunctionType, filename: str, text: str):
        self.function = function
        self.filename = filename
        self.text = text

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in _SLOTS:  # unset slot: do not recurse
            raise AttributeError(name)
        return getattr(self.function, name)

    def __reduce__(self):
        return (_restore_cell, (self.function, self.filename, self.text))

    def __repr__(self) -> str:
        return f"<pymw cell {self.filename}>"


_SLOTS = frozenset(BoundCell.__slots__)


def _refile(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(_refile(c, filename) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _restore_cell(function: types.FunctionType, filename: str, text: str) -> types.FunctionType:
    """Unpickling a :class:`BoundCell` (in a worker): the plain function,
    with the cell's filename on its code and its text in linecache."""
    register_source(filename, text)
    function.__code__ = _refile(function.__code__, filename)
    return function


def _syntax_error(msg: str, filename: str, node: ast.AST, text: str) -> SyntaxError:
    """A SyntaxError located at ``node``, as the compiler would make it."""
    lineno = getattr(node, "lineno", 1)
    col = getattr(node, "col_offset", 0)
    lines = text.splitlines()
    line = lines[lineno - 1] if 0 < lineno <= len(lines) else None
    end_lineno = getattr(node, "end_lineno", None) or lineno
    end_col = getattr(node, "end_col_offset", None)
    return SyntaxError(msg, (filename, lineno, col + 1, line,
                             end_lineno, (end_col + 1) if end_col is not None else None))


class _TopLevelChecker(ast.NodeVisitor):
    """Finds what a notebook cell may not contain at its top level but a
    function body could (``return``, ``yield``): wrapping the cell in a
    function must not quietly change its meaning."""

    def __init__(self) -> None:
        self.bad: tuple[str, ast.AST] | None = None

    def generic_visit(self, node: ast.AST) -> None:
        if self.bad is None:
            super().generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        self.bad = self.bad or ("'return' outside function", node)

    def visit_Yield(self, node: ast.Yield) -> None:
        self.bad = self.bad or ("'yield' outside function", node)

    def visit_YieldFrom(self, node: ast.YieldFrom) -> None:
        self.bad = self.bad or ("'yield' outside function", node)

    # Nested scopes may use all of these legitimately.
    def visit_FunctionDef(self, node: ast.AST) -> None:
        for deco in getattr(node, "decorator_list", ()):
            self.visit(deco)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for part in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(part)


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _rename(code: types.CodeType, old: str, new: str) -> types.CodeType:
    """Rename the cell function's code object (and the qualnames nested in
    it) so tracebacks say ``in <cell>`` rather than a placeholder."""
    consts = tuple(_rename(c, old, new) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    name = new if code.co_name == old else code.co_name
    qual = getattr(code, "co_qualname", None)  # Python 3.11+
    if qual is None:
        return code.replace(co_consts=consts, co_name=name)
    if qual == old or qual.startswith(old + "."):
        qual = new + qual[len(old):]
    return code.replace(co_consts=consts, co_name=name, co_qualname=qual)


#: How a class body reads a name that may be its own or a global.
_CLASS_BODY_LOADS = frozenset({"LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})


@dataclass(frozen=True)
class _Reads:
    names: tuple[str, ...]          # global names read, in first-use order
    lines: dict[str, int]           # where each is first read
    optional: frozenset[str]        # may be missing at bind time
    class_only: tuple[str, ...]     # read only by class bodies


def _analyse_reads(code: types.CodeType) -> _Reads:
    """The global names the cell's code reads.

    Ground truth is the compiled code, not a guess from the AST: in function
    scopes (the cell itself, nested functions, lambdas, comprehensions) a
    read of a notebook name is ``LOAD_GLOBAL``.  A class body reads with
    ``LOAD_NAME``, which may also find the class's own attributes, so there
    only names the body never stores count.  Names the cell declares
    ``global`` and assigns are optional: the cell may create them.
    """
    lines: dict[str, int] = {}
    global_loads: set[str] = set()
    assigned_globals: set[str] = set()
    for co in _code_objects(code):
        optimized = bool(co.co_flags & inspect.CO_OPTIMIZED)
        instructions = list(dis.get_instructions(co))
        stored = {i.argval for i in instructions if i.opname == "STORE_NAME"}
        line = co.co_firstlineno
        for ins in instructions:
            positions = getattr(ins, "positions", None)  # 3.11+; before, starts_line
            if positions is not None and positions.lineno is not None:
                line = positions.lineno
            elif isinstance(ins.starts_line, int) and not isinstance(ins.starts_line, bool):
                line = ins.starts_line
            if ins.opname == "LOAD_GLOBAL":
                lines.setdefault(ins.argval, line)
                global_loads.add(ins.argval)
            elif ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                assigned_globals.add(ins.argval)
            elif ins.opname in _CLASS_BODY_LOADS and not optimized and ins.argval not in stored:
                lines.setdefault(ins.argval, line)
    names = tuple(lines)
    class_only = tuple(n for n in names if n not in global_loads and n not in _BASE_GLOBAL_NAMES)
    return _Reads(names, lines, frozenset(assigned_globals), class_only)


def _with_class_reads(code: types.CodeType, names: Sequence[str], filename: str) -> types.CodeType:
    """Make names that only class bodies read travel with the function.

    cloudpickle ships the globals found by ``LOAD_GLOBAL`` in the function's
    code objects, and misses a class body's ``LOAD_NAME``.  An extra, never
    executed code object that loads those names, appended to the cell
    function's constants, makes it see them — at no cost per call.
    """
    if not names:
        return code
    holder = compile(f"lambda: ({', '.join(names)},)", filename, "eval", dont_inherit=True)
    refs = next(c for c in holder.co_consts if isinstance(c, types.CodeType))
    return code.replace(co_consts=code.co_consts + (refs,))


def with_class_reads(fn: types.FunctionType) -> types.FunctionType:
    """``fn``, or a copy of it whose code makes the names that only its
    class bodies read travel with it when cloudpickle sends it by value
    (what :func:`compile_cell` does for a cell, for a plain ``def`` such as
    an exported script's)."""
    code = fn.__code__
    class_only = _analyse_reads(code).class_only
    if not class_only:
        return fn
    copy = types.FunctionType(_with_class_reads(code, class_only, code.co_filename), fn.__globals__,
                              fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    copy.__dict__.update(fn.__dict__)
    return copy


def _is_standard_builtin(name: str) -> bool:
    if not hasattr(builtins, name):
        return False
    value = getattr(builtins, name)
    return getattr(value, "__module__", "builtins") in _STANDARD_BUILTIN_MODULES


@dataclass(frozen=True)
class CellFunction:
    """A compiled cell, ready to be bound to a namespace.

    ``params`` are the function's positional parameters (the ``--map``
    target's names), ``reads`` the notebook names it will capture (and
    ``read_lines`` the cell line where each is first read), ``inherited``
    the names it assigns but may read first (they start with the notebook's
    value), ``filename`` what tracebacks show and ``text`` the full text
    registered for it (the lines before the body included, so line numbers
    match).
    """

    source: str
    filename: str
    params: tuple[str, ...]
    reads: tuple[str, ...]
    read_lines: dict[str, int] = field(compare=False)
    optional: frozenset[str]
    inherited: tuple[str, ...]
    text: str
    code: types.CodeType = field(repr=False)
    _body: list = field(repr=False, compare=False, default_factory=list)
    _class_only: tuple[str, ...] = field(repr=False, compare=False, default=())
    _variants: dict = field(repr=False, compare=False, default_factory=dict)

    def capture(self, namespace: Mapping[str, Any]) -> dict[str, Any]:
        """The values of the names the cell reads, taken from ``namespace``
        now.  Real builtins are left out (every worker has them); a name
        found nowhere raises NameError naming it."""
        captured: dict[str, Any] = {}
        missing: list[str] = []
        for name in self.reads:
            if name in _BASE_GLOBAL_NAMES:
                continue
            if name in namespace:  # a notebook name shadows a builtin, as in Python
                captured[name] = namespace[name]
            elif _is_standard_builtin(name):
                continue
            elif hasattr(builtins, name):
                # A kernel-only "builtin" (IPython's display): send its value.
                captured[name] = getattr(builtins, name)
            elif name not in self.optional:
                missing.append(name)
        if missing:
            names = ", ".join(repr(n) for n in missing)
            if len(missing) == 1:
                msg = (f"name {names} is not defined: the cell reads it, but neither "
                       "the notebook nor Python's builtins define it")
            else:
                msg = (f"names {names} are not defined: the cell reads them, but neither "
                       "the notebook nor Python's builtins define them")
            raise NameError(msg, name=missing[0])
        return captured

    def bind(self, namespace: Mapping[str, Any]) -> BoundCell:
        """The task function: a :class:`BoundCell` around a plain function
        whose globals are the captured values only.

        The function's ``__module__`` is ``"__main__"`` so cloudpickle sends
        it by value, and the worker never needs the notebook's namespace.
        """
        fn_globals: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        fn_globals.update(self.capture(namespace))
        # Names read before they are assigned start as the notebook's value:
        # keyword-only parameters whose defaults are those values, so each
        # call starts afresh and the assignment stays in the task.
        start = {name: namespace[name] if name in namespace else getattr(builtins, name)
                 for name in self.inherited if name in namespace or hasattr(builtins, name)}
        fn = types.FunctionType(self._code_for(tuple(start)), fn_globals, CELL_FUNCTION_NAME)
        if start:
            fn.__kwdefaults__ = start
        fn.__qualname__ = CELL_FUNCTION_NAME
        fn.__doc__ = None
        return BoundCell(fn, self.filename, self.text)

    def _code_for(self, kwonly: tuple[str, ...]) -> types.CodeType:
        """The code with ``kwonly`` as keyword-only parameters (cached)."""
        if not kwonly:
            return self.code
        code = self._variants.get(kwonly)
        if code is None:
            module = _function_module(self._body, self.params, kwonly)
            code = _with_class_reads(_compile_function(module, self.filename),
                                     self._class_only, self.filename)
            self._variants[kwonly] = code
        return code

    @property
    def maybe_unset(self) -> tuple[str, ...]:
        """The ``inherited`` names a module may not define (not builtins):
        :meth:`to_source` starts them from :data:`UNSET`."""
        return tuple(k for k in self.inherited if not _is_standard_builtin(k))

    def to_source(self, name: str = "cell", *, unset: str = "UNSET") -> str:
        """The cell as the source of a plain ``def`` (for the exporter).

        Names the cell reads before assigning (``inherited``) become
        keyword-only parameters starting as the module's value at definition
        time, as :meth:`bind` does with the notebook's.  A name the module
        may not define then (``if x: y = 1`` then ``y``) defaults to
        ``globals().get(NAME, UNSET)`` and is unbound again first thing when
        it is :data:`UNSET`, so reading it fails as in the notebook; the
        module must bind the name ``unset`` to :data:`UNSET`.  A builtin's
        name always has a value (``sum=sum``).  The body is the cell's own
        text — comments and layout kept, the last expression prefixed with
        ``return`` — whenever that text parses to the same code as the
        translation; otherwise (rare: odd indentation) the translation
        itself, through :func:`ast.unparse`.
        """
        for what, ident in (("function", name), ("UNSET", unset)):
            if not ident.isidentifier() or keyword.iskeyword(ident):
                raise ValueError(f"{ident!r} is not a valid {what} name")
        maybe_unset = self.maybe_unset
        defaults: list[ast.expr] = [
            ast.Name(id=k, ctx=ast.Load()) if k not in maybe_unset else ast.Call(
                func=ast.Attribute(value=ast.Call(func=ast.Name(id="globals", ctx=ast.Load()), args=[],
                                                  keywords=[]), attr="get", ctx=ast.Load()),
                args=[ast.Constant(k), ast.Name(id=unset, ctx=ast.Load())], keywords=[])
            for k in self.inherited]
        args = ast.arguments(
            posonlyargs=[], args=[ast.arg(arg=p) for p in self.params], vararg=None,
            kwonlyargs=[ast.arg(arg=k) for k in self.inherited], kw_defaults=defaults,
            kwarg=None, defaults=[])
        # ``if y is UNSET: del y``: unbound, as bind() leaves a name the namespace lacks.
        prologue: list[ast.stmt] = [
            ast.If(test=ast.Compare(left=ast.Name(id=k, ctx=ast.Load()), ops=[ast.Is()],
                                    comparators=[ast.Name(id=unset, ctx=ast.Load())]),
                   body=[ast.Delete(targets=[ast.Name(id=k, ctx=ast.Del())])], orelse=[])
            for k in maybe_unset]
        fdef = ast.FunctionDef(name=name, args=args, body=prologue + self._body, decorator_list=[],
                               returns=None, type_comment=None, lineno=1, col_offset=0)
        module = ast.Module(body=[fdef], type_ignores=[])
        translated = ast.unparse(ast.fix_missing_locations(module)) + "\n"
        body = _indented_body(self.source)
        if body is not None:
            header = translated.split("\n", 1)[0]
            first = "  # not defined before the cell: unbound, as in the notebook"
            kept = f"{header}\n" + "".join(
                f"    if {k} is {unset}:{first if i == 0 else ''}\n        del {k}\n"
                for i, k in enumerate(maybe_unset)) + body
            try:
                if ast.dump(ast.parse(kept)) == ast.dump(ast.parse(translated)):
                    return kept
            except SyntaxError:
                pass
        return translated


def _indented_body(source: str) -> str | None:
    """``source`` as a function body: indented, with ``return`` put before
    a last expression.  None when there is no statement to keep.  The
    caller checks the result against the AST."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if not tree.body:
        return None
    lines = io.StringIO(source).readlines()  # split at \n only, as the tokenizer counts
    last = tree.body[-1]
    if isinstance(last, ast.Expr):
        row = last.lineno - 1
        # col_offset counts UTF-8 bytes
        col = len(lines[row].encode()[:last.col_offset].decode(errors="replace"))
        lines[row] = lines[row][:col] + "return " + lines[row][col:]
    return indent("".join(lines))


def indent(source: str, prefix: str = "    ") -> str:
    """``source`` with ``prefix`` before each line that starts a line of
    code — not before a line inside a multi-line string, whose text would
    change.  Blank lines stay empty."""
    string_kinds = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        tokens = []
    inside = {row for tok in tokens if tok.type in string_kinds and tok.end[0] > tok.start[0]
              for row in range(tok.start[0] + 1, tok.end[0] + 1)}  # 1-based rows
    return "".join((prefix + line if line.strip() and i + 1 not in inside else line)
                   + ("" if line.endswith("\n") else "\n")
                   for i, line in enumerate(io.StringIO(source).readlines()))


def _check_params(params: Sequence[str]) -> tuple[str, ...]:
    params = tuple(params)
    for p in params:
        if not isinstance(p, str) or not p.isidentifier() or keyword.iskeyword(p):
            raise ValueError(f"{p!r} is not a valid parameter name")
    dupes = sorted({p for p in params if params.count(p) > 1})
    if dupes:
        raise ValueError(f"parameter name {dupes[0]!r} is used twice")
    return params


def compile_cell(source: str, *, params: Sequence[str] = (), filename: str = "<pymw-cell>",
                 prefix: str = "") -> CellFunction:
    """Compile a cell body into a :class:`CellFunction`.

    ``prefix`` is the text that precedes the body in the cell (for a
    ``%%pymw`` cell, its first line): it is not compiled, but counted, so a
    SyntaxError or a traceback names the line the user sees.  Raises
    SyntaxError (located in ``filename``) for invalid source, including
    ``return``/``yield`` at the cell's top level, which a notebook cell
    rejects too.
    """
    params = _check_params(params)
    if prefix and not prefix.endswith("\n"):
        prefix += "\n"
    text = prefix + source
    register_source(filename, text)
    # Blank lines in place of the prefix keep every line number exact.
    padded = "\n" * prefix.count("\n") + source
    tree = ast.parse(padded, filename, "exec")

    checker = _TopLevelChecker()
    for stmt in tree.body:
        checker.visit(stmt)
    if checker.bad is not None:
        msg, node = checker.bad
        raise _syntax_error(msg, filename, node, text)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            module = "." * (node.level or 0) + (node.module or "")
            raise _syntax_error(
                f"'from {module} import *' cannot run in a task: the cell's body becomes a function, "
                f"where Python allows no 'import *'; import the names the cell uses, e.g. "
                f"'from {module} import name1, name2', or 'import {module}'", filename, node, text)

    inherited = _read_before_assigned(tree.body, params)
    body: list[ast.stmt] = list(tree.body)
    if body and isinstance(body[-1], ast.Expr):
        last = body[-1]
        body[-1] = ast.copy_location(ast.Return(value=last.value), last)
    if not body:
        body = [ast.Pass(lineno=prefix.count("\n") + 1, col_offset=0)]
    module = _function_module(body, params, ())
    fcode = _compile_function(module, filename)
    reads = _analyse_reads(fcode)
    fcode = _with_class_reads(fcode, reads.class_only, filename)
    return CellFunction(source=source, filename=filename, params=params, reads=reads.names,
                        read_lines=reads.lines, optional=reads.optional,
                        inherited=inherited, text=text, code=fcode,
                        _body=body, _class_only=reads.class_only)


def _function_module(body: list[ast.stmt], params: tuple[str, ...],
                     kwonly: tuple[str, ...]) -> ast.Module:
    """``def _pymw_cell(*params, *, *kwonly): body`` as a module AST."""
    first_line = body[0].lineno
    fdef = ast.FunctionDef(
        name=_DEF_NAME,
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=p) for p in params],
                           vararg=None, kwonlyargs=[ast.arg(arg=k) for k in kwonly],
                           kw_defaults=[None] * len(kwonly), kwarg=None, defaults=[]),
        body=body, decorator_list=[], returns=None, type_comment=None,
        lineno=first_line, col_offset=0,
        end_lineno=getattr(body[-1], "end_lineno", None) or first_line,
        end_col_offset=getattr(body[-1], "end_col_offset", None) or 0)
    return ast.fix_missing_locations(ast.Module(body=[fdef], type_ignores=[]))


def _compile_function(module: ast.Module, filename: str) -> types.CodeType:
    module_code = compile(module, filename, "exec", dont_inherit=True)
    fcode = next(c for c in module_code.co_consts
                 if isinstance(c, types.CodeType) and c.co_name == _DEF_NAME)
    return _rename(fcode, _DEF_NAME, CELL_FUNCTION_NAME)


class _FirstUse(ast.NodeVisitor):
    """Walks the cell's top-level scope in evaluation order, tracking the
    names *definitely* assigned at each point (a branch, a loop body or a
    ``try`` may not run), to find the names the cell may read before it
    assigns them (``data = data * 2``, ``if c: x = 1`` then ``x``)."""

    def __init__(self) -> None:
        self.assigned: set[str] = set()   # definitely bound here
        self.early: dict[str, None] = {}  # read where maybe not yet bound
        self.stored: set[str] = set()
        self.declared: set[str] = set()    # global/nonlocal: not locals
        self._hidden: list[set[str]] = []  # comprehension variables in scope

    def _load(self, name: str) -> None:
        if name not in self.assigned and not any(name in h for h in self._hidden):
            self.early.setdefault(name, None)

    def _store(self, name: str) -> None:
        self.assigned.add(name)
        self.stored.add(name)

    def _run(self, stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            self.visit(stmt)

    def _branches(self, *bodies: list[ast.stmt], may_skip: bool = False) -> None:
        """Exactly one of ``bodies`` runs (or none, if ``may_skip``): what
        all of them assign is assigned afterwards."""
        before = set(self.assigned)
        outs = []
        for body in bodies:
            self.assigned = set(before)
            self._run(body)
            outs.append(self.assigned)
        if may_skip:
            outs.append(before)
        self.assigned = set.intersection(*outs) if outs else before

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self._branches(node.body, node.orelse)

    def visit_While(self, node: ast.While) -> None:
        self.visit(node.test)
        self._branches(node.body, may_skip=True)
        self._branches(node.orelse, may_skip=True)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        before = set(self.assigned)
        self.visit(node.target)
        self._run(node.body)
        self.assigned = before  # the body may not run at all
        self._branches(node.orelse, may_skip=True)

    visit_AsyncFor = visit_For

    def visit_Try(self, node: Any) -> None:
        before = set(self.assigned)
        self._run(node.body)
        self._run(node.orelse)
        outs = [self.assigned]
        for handler in node.handlers:
            self.assigned = set(before)
            self.visit(handler)
            outs.append(self.assigned)
        after = set.intersection(*outs)
        self.assigned = set(before)
        self._run(node.finalbody)
        self.assigned = after | self.assigned

    visit_TryStar = visit_Try

    def visit_Match(self, node: Any) -> None:
        self.visit(node.subject)
        before = set(self.assigned)
        outs = [before]  # no case may match
        for case in node.cases:
            self.assigned = set(before)
            self.visit(case.pattern)
            if case.guard is not None:
                self.visit(case.guard)
            self._run(case.body)
            outs.append(self.assigned)
        self.assigned = set.intersection(*outs)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self._store(node.id)
        elif isinstance(node.ctx, ast.Del):
            # ``del tmp`` needs ``tmp`` bound and makes it a local of the
            # function: like an assignment, it starts as the notebook's value.
            self._load(node.id)
            self.stored.add(node.id)
            self.assigned.discard(node.id)
        else:
            self._load(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self.visit(node.target)
        elif not isinstance(node.target, ast.Name):
            self.visit(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)
            self.visit(node.value)
            self._store(node.target.id)
        else:
            self.visit(node.target)
            self.visit(node.value)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:
        self.declared.update(node.names)

    visit_Nonlocal = visit_Global

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._store(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._store(node.name)
        self._run(node.body)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # Evaluated now: decorators and defaults.  The body runs later, so
        # its reads of cell names are not reads "before".
        for expr in [*node.decorator_list, *node.args.defaults,
                     *(d for d in node.args.kw_defaults if d is not None)]:
            self.visit(expr)
        self._store(node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for expr in [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]:
            self.visit(expr)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(expr)
        self._store(node.name)

    def _comprehension(self, node: Any, parts: list[ast.AST]) -> None:
        hidden: set[str] = set()
        self._hidden.append(hidden)
        try:
            for gen in node.generators:
                self.visit(gen.iter)
                hidden.update(n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name))
                for cond in gen.ifs:
                    self.visit(cond)
            for part in parts:
                self.visit(part)
        finally:
            self._hidden.pop()

    def visit_ListComp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, [node.key, node.value])

    def visit_MatchAs(self, node: Any) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self._store(node.name)

    def visit_MatchStar(self, node: Any) -> None:
        if node.name:
            self._store(node.name)

    def visit_MatchMapping(self, node: Any) -> None:
        self.generic_visit(node)
        if node.rest:
            self._store(node.rest)


def _read_before_assigned(body: list[ast.stmt], params: tuple[str, ...]) -> tuple[str, ...]:
    """Names the cell assigns but may read first, in first-use order.

    In a notebook, ``data = data * 2`` reads the notebook's ``data``; in a
    function, ``data`` is local throughout and that read would fail.  Such
    names start with the notebook's value (see :meth:`CellFunction.bind`).
    """
    walker = _FirstUse()
    walker._run(body)
    return tuple(name for name in walker.early
                 if name in walker.stored and name not in params and name not in walker.declared)


# --- --map TARGET in EXPR -------------------------------------------------

class MapError(ValueError):
    """An item of a ``--map`` iterable does not fit the target, or the
    iterable is not one: the input is wrong, not the cell."""


def _target_names(node: ast.expr, out: list[str]) -> None:
    if isinstance(node, ast.Name):
        out.append(node.id)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            _target_names(elt, out)
    elif isinstance(node, ast.Starred):
        _target_names(node.value, out)
    else:
        raise ValueError(f"{ast.unparse(node)!r} cannot be a --map target: use names, "
                         "e.g. 'x' or 'a, b'")


@dataclass(frozen=True)
class MapSpec:
    """A parsed ``TARGET in EXPR``.

    ``names`` are the target's names in order (the cell function's
    parameters); ``iterable`` is EXPR's source, evaluated in the notebook.
    """

    target: str
    names: tuple[str, ...]
    iterable: str
    _unpack: Callable[[Any], tuple] = field(repr=False, compare=False)

    def unpack(self, item: Any) -> tuple:
        """The arguments of one task: ``item`` assigned to the target."""
        return self._unpack(item)

    def arguments(self, namespace: dict[str, Any]) -> list[tuple]:
        """Evaluate EXPR in ``namespace`` and unpack every item, so an item
        that does not fit the target fails here, before any task starts."""
        code = compile(self.iterable, "<pymw-map>", "eval", dont_inherit=True)
        values = eval(code, namespace)  # noqa: S307 - the user's own expression
        try:
            iterator = iter(values)
        except TypeError:
            raise MapError(f"--map: {self.iterable!r} is not iterable "
                           f"({type(values).__name__})") from None
        out = []
        for i, item in enumerate(iterator):
            try:
                out.append(self._unpack(item))
            except (TypeError, ValueError) as exc:
                shown = repr(item)
                if len(shown) > 60:
                    shown = shown[:57] + "..."
                raise MapError(f"--map: item {i} ({shown}) does not unpack into "
                               f"{self.target!r}: {exc}") from None
        return out


def parse_map(text: str) -> MapSpec:
    """Parse ``TARGET in EXPR`` (``x in range(10)``, ``a, b in zip(xs, ys)``).

    Raises ValueError with a message fit for a usage error.
    """
    text = text.strip()
    try:
        tree = ast.parse(f"for {text}:\n pass\n", "<pymw-map>", "exec")
    except SyntaxError:
        raise ValueError(f"--map expects 'TARGET in EXPR' (e.g. 'x in range(10)'), "
                         f"got {text!r}") from None
    loop = tree.body[0]
    if len(tree.body) != 1 or not isinstance(loop, ast.For):
        raise ValueError(f"--map expects 'TARGET in EXPR', got {text!r}")
    names: list[str] = []
    _target_names(loop.target, names)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--map target names {dupes[0]!r} twice")
    src = f"for {text}:\n pass\n"
    target_src = ast.get_source_segment(src, loop.target) or ast.unparse(loop.target)
    iter_src = ast.get_source_segment(src, loop.iter) or ast.unparse(loop.iter)
    if isinstance(loop.target, ast.Name):
        def unpack(item: Any) -> tuple:
            return (item,)
    else:
        # Unpacking by Python's own assignment gives its exact semantics
        # (starred targets, nesting) and its error messages.
        ns: dict[str, Any] = {}
        try:
            code = compile(f"def _unpack(_pymw_item):\n {target_src} = _pymw_item\n"
                           f" return ({', '.join(names)},)\n", "<pymw-map>", "exec", dont_inherit=True)
        except SyntaxError as exc:  # a lone starred target (*x in ...), which Python refuses too
            hint = f"; write '{target_src}, in ...'" if isinstance(loop.target, ast.Starred) else ""
            raise ValueError(f"--map target {target_src!r} cannot be assigned: {exc.msg}{hint}") from None
        exec(code, ns)
        unpack = ns["_unpack"]
    return MapSpec(target=target_src, names=tuple(names), iterable=iter_src, _unpack=unpack)
