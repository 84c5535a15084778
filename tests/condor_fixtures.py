"""Fixtures the HTCondor tests share: a job store of the test's own (one
the pool's job user can reach on a real pool), the stand-in schedd, and a
schedd parameter that is the stand-in here and a real schedd where one
answers.  A test module takes them with ``from condor_fixtures import ...``
(``home`` is autouse in the modules that import it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

htcondor2 = pytest.importorskip("htcondor2")

from pymw_magic.testing.condor import StandInSchedd  # noqa: E402


def live_reason() -> str | None:
    """None when a real schedd answers here, else why the live runs skip."""
    if os.environ.get("PYMW_CONDOR_LIVE") == "1":
        return None
    try:
        htcondor2.Collector().locate(htcondor2.DaemonType.Schedd)
    except Exception as exc:
        return f"no HTCondor pool answers here (htcondor2.Collector().locate: {exc}); set PYMW_CONDOR_LIVE=1 where one does"
    return None


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A job store of the test's own; on a real pool, one the pool's job
    user can reach (PYMW_CONDOR_HOME)."""
    path = os.environ.get("PYMW_CONDOR_HOME") if live_reason() is None else None
    path = Path(path) / f"t{time.time_ns()}" if path else tmp_path / "home"
    monkeypatch.setenv("PYMW_HOME", str(path))
    return path


@pytest.fixture
def standin(tmp_path):
    s = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    yield s
    s.stop()


@pytest.fixture(params=["standin", "live"])
def schedd(request, tmp_path):
    """The stand-in, or a real schedd where one answers."""
    if request.param == "live":
        why = live_reason()
        if why:
            pytest.skip(why)
        yield htcondor2.Schedd()
        return
    s = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    yield s
    s.stop()
