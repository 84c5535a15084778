"""Turning a notebook cell's source into a task function.

This module owns the one translation the notebook surface rests on: a cell
body (what follows a ``%%pymw`` line) becomes an ordinary Python function
that a worker can run.  The rules are those of a notebook cell:

* names the cell *reads* and does not assign are taken from the notebook's
  namespace **by value, when the function is bound** (at submit time) — the
  function's globals hold only those names, never the live namespace;
* names the cell *assigns* are locals of the task;
* the value of the cell's last expression is the task's result (like
  ``Out[N]``); a cell ending in a statement returns ``None``;
* ``--map`` targets (``x``, ``a, b``, ``(i, (j, k))``) become the function's
  parameters: :class:`MapSpec` unpacks each item of the iterable in the
  master, so a bad item is reported before any task starts.

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
import keyword
import linecache
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "BoundCell", "CellFunction", "MapSpec", "compile_cell", "parse_map", "register_source",
    "call_cell",
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
    qual = code.co_qualname
    if qual == old or qual.startswith(old + "."):
        qual = new + qual[len(old):]
    return code.replace(co_consts=consts, co_name=name, co_qualname=qual)


def _analyse_reads(code: types.CodeType) -> tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]:
    """The global names the cell's code reads, in first-use order, the
    subset that need not exist when the cell is bound, and the names read
    only by class bodies (see :func:`_with_class_reads`).

    Ground truth is the compiled code, not a guess from the AST: in function
    scopes (the cell itself, nested functions, lambdas, comprehensions) a
    read of a notebook name is ``LOAD_GLOBAL``.  A class body reads with
    ``LOAD_NAME``, which may also find the class's own attributes, so there
    only names the body never stores count.  Names the cell declares
    ``global`` and assigns are optional: the cell may create them.
    """
    reads: dict[str, None] = {}
    global_loads: set[str] = set()
    assigned_globals: set[str] = set()
    for co in _code_objects(code):
        optimized = bool(co.co_flags & inspect.CO_OPTIMIZED)
        instructions = list(dis.get_instructions(co))
        stored = {i.argval for i in instructions if i.opname == "STORE_NAME"}
        for ins in instructions:
            if ins.opname == "LOAD_GLOBAL":
                reads.setdefault(ins.argval, None)
                global_loads.add(ins.argval)
            elif ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                assigned_globals.add(ins.argval)
            elif ins.opname == "LOAD_NAME" and not optimized and ins.argval not in stored:
                reads.setdefault(ins.argval, None)
    class_only = tuple(n for n in reads if n not in global_loads and n not in _BASE_GLOBAL_NAMES)
    return tuple(reads), frozenset(assigned_globals), class_only


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


def _is_standard_builtin(name: str) -> bool:
    if not hasattr(builtins, name):
        return False
    value = getattr(builtins, name)
    return getattr(value, "__module__", "builtins") in _STANDARD_BUILTIN_MODULES


@dataclass(frozen=True)
class CellFunction:
    """A compiled cell, ready to be bound to a namespace.

    ``params`` are the function's positional parameters (the ``--map``
    target's names), ``reads`` the notebook names it will capture,
    ``filename`` what tracebacks show and ``text`` the full text registered
    for it (the lines before the body included, so line numbers match).
    """

    source: str
    filename: str
    params: tuple[str, ...]
    reads: tuple[str, ...]
    optional: frozenset[str]
    text: str
    code: types.CodeType = field(repr=False)
    tree: ast.Module = field(repr=False, compare=False)

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
        fn = types.FunctionType(self.code, fn_globals, CELL_FUNCTION_NAME)
        fn.__qualname__ = CELL_FUNCTION_NAME
        fn.__doc__ = None
        return BoundCell(fn, self.filename, self.text)

    def to_source(self, name: str = "cell") -> str:
        """The cell as the source of a plain ``def`` (for the exporter).

        Produced with :func:`ast.unparse`: the code is equivalent, but
        comments and formatting are not kept.
        """
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"{name!r} is not a valid function name")
        fdef = self.tree.body[0]
        assert isinstance(fdef, ast.FunctionDef)
        renamed = ast.FunctionDef(
            name=name, args=fdef.args, body=fdef.body, decorator_list=[],
            returns=None, type_comment=None, lineno=1, col_offset=0)
        module = ast.Module(body=[renamed], type_ignores=[])
        return ast.unparse(ast.fix_missing_locations(module)) + "\n"



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

    body: list[ast.stmt] = list(tree.body)
    if body and isinstance(body[-1], ast.Expr):
        last = body[-1]
        body[-1] = ast.copy_location(ast.Return(value=last.value), last)
    if not body:
        body = [ast.Pass(lineno=prefix.count("\n") + 1, col_offset=0)]
    first_line = body[0].lineno
    fdef = ast.FunctionDef(
        name=_DEF_NAME,
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=p) for p in params],
                           vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None,
                           defaults=[]),
        body=body, decorator_list=[], returns=None, type_comment=None,
        lineno=first_line, col_offset=0,
        end_lineno=getattr(body[-1], "end_lineno", None) or first_line,
        end_col_offset=getattr(body[-1], "end_col_offset", None) or 0)
    module = ast.fix_missing_locations(ast.Module(body=[fdef], type_ignores=[]))
    module_code = compile(module, filename, "exec", dont_inherit=True)
    fcode = next(c for c in module_code.co_consts
                 if isinstance(c, types.CodeType) and c.co_name == _DEF_NAME)
    fcode = _rename(fcode, _DEF_NAME, CELL_FUNCTION_NAME)
    reads, optional, class_only = _analyse_reads(fcode)
    fcode = _with_class_reads(fcode, class_only, filename)
    return CellFunction(source=source, filename=filename, params=params, reads=reads,
                        optional=optional, text=text, code=fcode, tree=module)


def call_cell(fn: Callable[[], Any]) -> Any:
    """Run a parameterless cell function: the job function of a cell
    without ``--map``, whose single task's argument is the cell function."""
    return fn()


# --- --map TARGET in EXPR -------------------------------------------------

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
            raise TypeError(f"--map: {self.iterable!r} is not iterable "
                            f"({type(values).__name__})") from None
        out = []
        for i, item in enumerate(iterator):
            try:
                out.append(self._unpack(item))
            except (TypeError, ValueError) as exc:
                shown = repr(item)
                if len(shown) > 60:
                    shown = shown[:57] + "..."
                raise ValueError(f"--map: item {i} ({shown}) does not unpack into "
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
        exec(compile(f"def _unpack(_pymw_item):\n {target_src} = _pymw_item\n"
                     f" return ({', '.join(names)},)\n", "<pymw-map>", "exec",
                     dont_inherit=True), ns)
        unpack = ns["_unpack"]
    return MapSpec(target=target_src, names=tuple(names), iterable=iter_src, _unpack=unpack)
