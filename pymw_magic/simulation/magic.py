"""The ``%pymw tune`` subcommand (registered in the magics' subcommand registry
when this module is imported, which ``pymw_magic.load_ipython_extension``
does).  A front-end module, though it lives beside the simulator: it sits
in the top layer with the magics (see docs/architecture.md).

::

    %pymw tune [FN ITEMS] [--tasks N] [--work SPEC] [--duration D] [--hosts N]
               [--spread S] [--availability A] [--failure-rate P] [--policy P]
               [--chunksize C] [--seed S] [--churn L]

``--availability`` takes a fraction of time up (``0.8``) or, as ``%pymw use
simulator --availability`` does, a spec (``onoff:UP,DOWN``, ``periodic:UP,DOWN``,
``always``, a trace file).

FN and ITEMS are expressions in the notebook's namespace (quote ITEMS if it
holds spaces); without them the workload is ``--tasks`` synthetic tasks of
``--work`` seconds (a number, ``uniform:A,B`` or ``lognormal:M,S``).
Returns the :class:`~pymw_magic.widgets.tuning.Tuner` (shown as the cell's
output).
"""

from __future__ import annotations

from typing import Any

from ..magics import subcommand
from ..options import OptionError, parse_options


def _availability(text: str) -> str | float:
    from ..widgets.tuning import availability_setting
    availability_setting(text)   # ValueError with what is valid
    try:
        return float(text)
    except ValueError:
        return text


_OPTIONS = {
    "tasks": int, "work": str, "duration": str, "hosts": int, "spread": float, "availability": _availability,
    "failure_rate": float, "policy": str, "chunksize": int, "seed": int, "uptime": float, "retries": int,
    "churn": float,
}
USAGE = ("%pymw tune [FN ITEMS] [--tasks N] [--work SPEC] [--duration D] [--hosts N] [--spread S] "
         "[--availability A] [--failure-rate P] [--policy P] [--chunksize C] [--seed S] [--churn L]")


@subcommand("tune", USAGE, "the simulation tuning widget: sliders re-run the simulator and redraw")
def tune_subcommand(magics: Any, args: str) -> Any:
    """``%pymw tune ...`` (a bad option is an OptionError, a UsageError in IPython)."""
    from ..widgets.tuning import tune

    parsed = parse_options(args)
    kwargs: dict[str, Any] = {}
    for key, raw in parsed.options.items():
        if key not in _OPTIONS:
            valid = ", ".join("--" + k.replace("_", "-") for k in _OPTIONS)
            raise OptionError(f"unknown option --{key.replace('_', '-')} for %pymw tune; valid: {valid}")
        if raw is True:
            raise OptionError(f"--{key.replace('_', '-')} needs a value")
        try:
            kwargs[key] = _OPTIONS[key](raw)
        except ValueError as exc:
            kind = _OPTIONS[key]
            what = "a whole number" if kind is int else "a number" if kind is float else None
            raise OptionError(f"bad value for --{key.replace('_', '-')}: "
                             + (f"{raw!r} is not {what}" if what else str(exc))) from None
    fn = items = None
    if parsed.positional:
        if len(parsed.positional) != 2:
            raise OptionError("usage: " + USAGE + " (FN and ITEMS come together)")
        ns = magics.shell.user_ns
        try:
            fn = eval(parsed.positional[0], ns)  # noqa: S307 - the user's own notebook expression
            items = eval(parsed.positional[1], ns)  # noqa: S307
        except Exception as exc:
            raise OptionError(f"%pymw tune: cannot evaluate {exc}") from None
    try:
        return tune(fn, items, **kwargs)
    except ValueError as exc:
        raise OptionError(f"%pymw tune: {exc}") from None
