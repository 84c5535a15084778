"""The one grammar of ``--name value`` lines and their validation.

This module owns how every front end reads options: the ``%%pymw`` line,
``%pymw use``, the exported script's command line (and ``pymw-magic
export``'s), and the dashboard's form all come here.

* :func:`parse_options` splits a line into positional words and raw
  ``--name value`` texts (``--map`` takes its Python spec verbatim);
* :func:`validate` converts each raw text by its declaration — the cell's
  own options (:func:`cell_options`), the Master's and each backend's
  (:class:`~pymw_magic.backends.Option`, declared in :mod:`pymw_magic.backends`)
  — before any master or task exists;
* :func:`add_backend_arguments` is the same declarations as ``argparse``
  arguments, for the command lines.

A usage error is an :class:`OptionError` (a ValueError) whose message
names the option and what is valid; the magics show it as IPython's
UsageError.  Nothing here imports IPython.

Its layer: what front ends share (the layers are drawn in ``pymw_magic/__init__.py``
and docs/architecture.md).
"""

from __future__ import annotations

import argparse
import contextlib
import keyword
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .backends import Option, backend_names as _registered, get_backend
from .backends import master_options as _declared_master_options
from .policies import set_name_resolver

__all__ = [
    "OptionError", "ParsedLine", "DEFAULT_BACKEND", "JOB_LEVEL", "FLAGS",
    "parse_options", "strip_comment", "parse_cell_line", "validate", "parse_use", "convert_now", "convert", "check_backend", "check_cell_line",
    "backend_names", "master_options", "backend_options", "cell_options", "flag", "describe_options",
    "add_backend_arguments", "backend_arguments",
]


class OptionError(ValueError):
    """A line or an option value that does not fit its declaration; the
    message names the option and what is valid."""


#: Backend used when a cell runs before any ``%pymw use``.
DEFAULT_BACKEND = "local"

#: Options that are per job (passed to ``map_async``) when given on a cell.
JOB_LEVEL = ("retries", "timeout")

#: Options given bare (``--nowait``), never followed by a value.
FLAGS = frozenset({"nowait"})


# --- declarations -------------------------------------------------------------------

def is_identifier(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


def backend_names() -> tuple[str, ...]:
    """The registered backends' names."""
    return tuple(_registered())


def check_backend(name: str) -> str:
    """``name`` when it is a registered backend, else an OptionError listing them."""
    names = backend_names()
    if name not in names:
        raise OptionError(f"unknown backend {name!r}; valid backends: {', '.join(names)}")
    return name


def master_options() -> dict[str, Option]:
    """Options every backend's Master takes."""
    return _declared_master_options()


def backend_options(backend: str) -> dict[str, Option]:
    """The options ``backend`` declares (``name -> Option``)."""
    return dict(getattr(get_backend(backend), "options", {}) or {})


def cell_options() -> dict[str, Option]:
    """Options of the cell magic only (not of ``%pymw use``); ``map`` is
    parsed apart because EXPR may hold spaces."""
    return {
        "backend": Option("backend", str, None, "backend for this cell (default: the %pymw use one)",
                          choices=backend_names()),
        "map": Option("map", str, None, "TARGET in EXPR: one task per item (x in xs, a, b in zip(xs, ys))"),
        "out": Option("out", str, None, "variable for the results (with --nowait, the Job)",
                      check=is_identifier, requirement="a Python variable name"),
        "name": Option("name", str, None, "the job's name (default cell-N)"),
        "nowait": Option("nowait", bool, False, "return at once; the Job goes to --out (or _pymw_job)"),
        "chunksize": Option("chunksize", int, None, "tasks handed to a worker at once (default: automatic)",
                            check=lambda n: n >= 1, requirement="a whole number >= 1"),
    }


def flag(name: str) -> str:
    """An option's name as written on a line: ``failure_rate`` -> ``--failure-rate``."""
    return "--" + name.replace("_", "-")


def describe_options(decls: Mapping[str, Any]) -> str:
    return ", ".join(flag(n) for n in decls)


# --- converting one value -------------------------------------------------------------

def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


# What float() and int() say inside a converter: less than the requirement.
_BUILTIN_WORDS = re.compile(r"could not convert|invalid literal for|.*\bargument must be\b")


def _converter_reason(opt: Option, raw: str) -> str | None:
    """Why ``opt``'s own converter refuses ``raw``, in its own words, when
    it says more than the declaration's requirement ("up time must be > 0"
    rather than "is not onoff:UP,DOWN, ..."); None when it says nothing."""
    if opt.type in (int, float, str, bool) or not isinstance(raw, str):
        return None  # builtins' messages ("invalid literal for int()") say less than the requirement
    try:
        opt.type(raw)
    except (TypeError, ValueError) as exc:
        reason = str(exc)
        if not reason or reason in (raw, repr(raw)) or _BUILTIN_WORDS.match(reason):
            return None
        return re.sub(r"^option '[^']*': ", "", reason)
    return None


@contextlib.contextmanager
def _names_deferred() -> Iterator[list[str]]:
    """While converting: names the converters ask for (``--duration
    model``, ``--policy pick``) are recorded, not resolved; the list of
    them is yielded.  Used where the notebook's names do not exist yet (an
    export, a script's command line before its code ran)."""
    asked: list[str] = []

    def record(name: str) -> Any:
        asked.append(name)
        raise KeyError(name)

    set_name_resolver(record)
    try:
        yield asked
    finally:
        set_name_resolver(None)


def convert(opt: Option, raw: str | bool, *, defer_names: bool = False) -> Any:
    """An option's text converted by its declaration; an OptionError naming
    the option, the converter's own reason and what is valid when it does
    not fit.  ``defer_names``: a value naming something of the notebook is
    kept as text, to be converted where that name exists."""
    name = flag(opt.name)
    if raw is True:  # given bare
        if opt.type is bool:
            return True
        raise OptionError(f"{name} needs a value" + (f" ({opt.requirement})" if opt.requirement else ""))
    if defer_names:
        with _names_deferred() as asked:
            try:
                return convert(opt, raw)
            except OptionError:
                if not asked:
                    raise
            return raw  # a notebook name: converted at run time, where it is defined
    try:
        if opt.type is bool:
            return _to_bool(raw)
        return opt.convert(raw)
    except ValueError as exc:
        detail = re.sub(r"^option '[^']*': ", "", str(exc))  # we name the flag already
        reason = _converter_reason(opt, raw)
        if reason and reason not in detail:
            said = " is not " in reason  # the converter listed what is valid itself
            detail = reason + (f" (valid: {opt.requirement})" if opt.requirement and not said else "")
        if opt.choices and "one of" not in detail:
            detail += f"; valid values: {', '.join(map(str, opt.choices))}"
        raise OptionError(f"bad value for {name}: {detail}") from None


# --- parsing a line ---------------------------------------------------------------------

_OPTION_START = re.compile(r"\s--[A-Za-z]")


def _map_spec_end(line: str, start: int) -> int:
    """Where a ``--map`` spec starting at ``start`` ends: at the first
    `` --option`` outside brackets and strings (EXPR may hold spaces,
    commas and quotes), else at the end of the line."""
    depth = 0
    quote: str | None = None
    i = start
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if line.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
        elif ch in "'\"":
            quote = line[i:i + 3] if line[i:i + 3] in ('"""', "'''") else ch
            i += len(quote)
            continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth <= 0 and _OPTION_START.match(line, i):
            return i
        i += 1
    return len(line)


@dataclass
class ParsedLine:
    """A magic line split into positional words and ``--option`` values
    (raw text, or True for a bare flag); option names use underscores."""

    positional: list[str] = field(default_factory=list)
    options: dict[str, str | bool] = field(default_factory=dict)


def check_cell_line(line: str) -> None:
    """A ``%%pymw`` line ending in a backslash: IPython gives a cell magic
    one line, so what the user meant as its continuation is the body's
    first line (which then fails to compile, far from the cause)."""
    if line.rstrip().endswith("\\"):
        raise OptionError("the %%pymw line cannot be continued with a backslash; write the --map "
                          "(and every option) on one line")


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``: a ``#`` outside quotes
    that starts a word (``--workers 2  # two``), as in Python and the
    shell; ``job#1`` and ``'#'`` are kept.  IPython hands a magic its line
    with the comment, which would otherwise be read as options."""
    quote: str | None = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line


def parse_options(line: str) -> ParsedLine:
    """Split a magic line. ``--map`` takes the rest of its spec verbatim;
    everything else is shell-like words (quotes group); a trailing
    ``# comment`` is dropped."""
    parsed = ParsedLine()
    rest = strip_comment(line)
    m = re.search(r"(?:^|\s)--map(?:=|\s+|$)", rest)
    if m:
        end = _map_spec_end(rest, m.end())
        spec = rest[m.end():end].strip()
        if not spec:
            raise OptionError("--map needs 'TARGET in EXPR', e.g. --map x in range(10)")
        parsed.options["map"] = spec
        rest = rest[:m.start()] + " " + rest[end:]
        if re.search(r"(?:^|\s)--map(?:=|\s|$)", rest):
            raise OptionError("--map is given twice")
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise OptionError(f"cannot parse the options: {exc}") from None
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and len(word) > 2:
            name, eq, value = word[2:].partition("=")
            key = name.replace("-", "_")
            raw: str | bool
            if eq:
                raw = value
            elif key in FLAGS:
                raw = True
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                i += 1
                raw = words[i]
            else:
                raw = True
            if key in parsed.options:
                raise OptionError(f"--{name} is given twice")
            parsed.options[key] = raw
        elif word.startswith("-") and len(word) > 1:
            raise OptionError(f"unknown option {word!r}; options are written --name VALUE")
        else:
            parsed.positional.append(word)
        i += 1
    return parsed


def validate(options: Mapping[str, str | bool], *, backend: str, cell: bool,
             defer_names: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and convert options against their declarations, before
    anything is built.  Returns (master and backend options, cell options).
    ``defer_names``: values naming notebook objects stay text (see :func:`convert`)."""
    copts = cell_options() if cell else {}
    mopts = master_options()
    bopts = backend_options(backend)
    master_kw: dict[str, Any] = {}
    cell_kw: dict[str, Any] = {}
    for key, raw in options.items():
        if key in copts:
            cell_kw[key] = raw if key == "map" else convert(copts[key], raw)
        elif key in mopts or key in bopts:
            master_kw[key] = convert(bopts.get(key) or mopts[key], raw, defer_names=defer_names)
        else:
            where = "%%pymw" if cell else "%pymw use"
            owners = [name for name in backend_names() if key in backend_options(name)]
            if owners:  # another backend's option: say which, the likely mix-up
                raise OptionError(
                    f"unknown option {flag(key)} for {where}: it is an option of the "
                    f"{' and '.join(repr(o) for o in owners)} backend"
                    f"{'s' if len(owners) > 1 else ''}, not of {backend!r}"
                    + ((f" (add --backend {owners[0]} to run this cell there)"
                        if "backend" not in options else "") if cell else
                       f"; {backend!r} backend options: {describe_options(bopts) or 'none'}"))
            parts = []
            if cell:
                parts.append("cell options: " + describe_options(copts))
            parts.append("master options: " + describe_options(mopts))
            parts.append(f"{backend!r} backend options: " + (describe_options(bopts) or "none"))
            raise OptionError(f"unknown option {flag(key)} for {where}; valid are " + "; ".join(parts))
    return master_kw, cell_kw


def parse_use(args: str, *, defer_names: bool = False) -> tuple[str, dict[str, Any], ParsedLine]:
    """``%pymw use BACKEND [options]``'s arguments: the backend, its
    validated options, and the parsed line (the options' text)."""
    parsed = parse_options(args)
    if len(parsed.positional) > 1:
        raise OptionError(f"unexpected {' '.join(parsed.positional[1:])!r} after the backend: usage: "
                          "%pymw use BACKEND [--name VALUE ...]")
    if len(parsed.positional) != 1:
        raise OptionError("usage: %pymw use BACKEND [options]; backends: " + ", ".join(backend_names()))
    backend = check_backend(parsed.positional[0])
    options, _ = validate(parsed.options, backend=backend, cell=False, defer_names=defer_names)
    return backend, options, parsed


def parse_cell_line(line: str, *, default_backend: str,
                    defer_names: bool = False) -> tuple[ParsedLine, str | None, dict[str, Any], dict[str, Any]]:
    """A ``%%pymw`` line checked whole, before anything is built: the parsed
    line, the ``--backend`` it asks for (or None), its master and backend
    options (job-level ones included), and its cell options."""
    check_cell_line(line)
    parsed = parse_options(line)
    if parsed.positional:
        raise OptionError(f"unexpected {' '.join(parsed.positional)!r}: %%pymw takes only "
                          "--options (see %pymw help)")
    raw_backend = parsed.options.get("backend")
    if raw_backend is True:
        raise OptionError("--backend needs a value; valid backends: " + ", ".join(backend_names()))
    asked = check_backend(raw_backend) if isinstance(raw_backend, str) else None
    master_kw, cell_kw = validate(parsed.options, cell=True, backend=asked or default_backend,
                                  defer_names=defer_names)
    cell_kw.pop("backend", None)
    return parsed, asked, master_kw, cell_kw


def convert_now(backend: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options kept as text by ``defer_names`` converted now that the names
    they give exist (a script's master is made after the notebook's code ran)."""
    decls = {**master_options(), **backend_options(backend)}
    return {key: convert(decls[key], value) if isinstance(value, str) and key in decls else value
            for key, value in options.items()}


# --- the same declarations on a command line ----------------------------------------------

_DEST = "pymw_option_"  # argparse dests of the declared options, apart from a parser's own


class _Once(argparse.Action):
    """Store an option's text, refusing it given twice (as a magic's line
    does): argparse alone keeps the last silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if self.dest in getattr(namespace, "_pymw_given", set()):
            parser.error(f"{option_string} is given twice")
        namespace.__dict__.setdefault("_pymw_given", set()).add(self.dest)
        setattr(namespace, self.dest, values)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend`` and one ``--NAME VALUE`` per declared option (the
    Master's, then each backend's).  Values stay text: :func:`validate`
    converts them against the backend finally chosen, so a bad value is
    named with what is valid."""
    group = parser.add_argument_group(
        "backend and options", "the master's options, then each backend's (validated against --backend)")
    group.add_argument("--backend", choices=backend_names(), default=None, action=_Once,
                       help="the backend to run on (default: the notebook's %%pymw use)")
    owners: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    for opt in master_options().values():
        helps[opt.name] = opt.help
        owners[opt.name] = []
    for backend in backend_names():
        for opt in get_backend(backend).options.values():
            helps.setdefault(opt.name, opt.help)
            owners.setdefault(opt.name, []).append(backend)
    for name, help_text in helps.items():
        where = f" [{', '.join(owners[name])}]" if owners[name] else ""
        group.add_argument("--" + name.replace("_", "-"), dest=_DEST + name, metavar=name.upper(),
                           default=argparse.SUPPRESS, action=_Once,
                           help=(help_text + where).replace("%", "%%"))


def backend_arguments(ns: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """The ``--backend`` given (or None) and the options given, as text."""
    options = {key[len(_DEST):]: value for key, value in vars(ns).items() if key.startswith(_DEST)}
    return getattr(ns, "backend", None), options
