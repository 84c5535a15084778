"""Hostile inputs to the HTCondor backend's batch path: a schedd locator
or store record naming a class that is not a schedd, outputs and failures
a node may forge."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("htcondor2")

from pymw_magic.backends.condor import _schedd, schedd_from_locator, schedd_from_record  # noqa: E402
from conftest import by_value  # noqa: E402


MADE: list = []


class Spy:
    """A class with no schedd methods whose constructor has an effect."""

    def __init__(self, *args):
        MADE.append(args)


@pytest.mark.parametrize("how", ["locator", "record", "option"])
def test_a_class_that_is_not_a_schedd_is_never_constructed(how):
    MADE.clear()
    name = f"{__name__}:Spy"
    if how == "locator":
        with pytest.raises(TypeError, match="not a schedd class"):
            schedd_from_locator(f"{name}('x')")
    elif how == "record":
        with pytest.raises(TypeError, match="not a schedd class"):
            schedd_from_record({"kind": "object", "class": name, "args": ["x"]})
    else:
        with pytest.raises(ValueError, match="not a schedd class"):
            _schedd(f"{name}('x')")
    assert MADE == []


def test_a_popen_locator_runs_no_command(tmp_path):
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    try:
        made = schedd_from_locator(f"subprocess:Popen({cmd!r})")
    except TypeError as exc:
        assert "not a schedd class" in str(exc)
    else:
        made.wait(timeout=60)
        pytest.fail("subprocess.Popen was made from a schedd locator: the command ran")
    assert not marker.exists()


def test_a_schedd_class_is_still_made_from_its_locator(tmp_path):
    from pymw_magic.testing.condor import StandInSchedd
    s = schedd_from_locator(f"pymw_magic.testing.condor:StandInSchedd({str(tmp_path / 'r')!r})")
    try:
        assert isinstance(s, StandInSchedd)
    finally:
        s.stop()


@pytest.mark.parametrize("doc", [b'{"v":{"$c":[' + b"9" * 400 + b',0]},"a":[]}',
                                 b'{"v":[1,{"$c":[0,-' + b"7" * 4000 + b']}],"a":[]}'])
def test_a_complex_past_float_range_is_a_codec_error(doc):
    """The safe codec answers bytes it will not read with CodecError, never
    another exception from deep inside (the BOINC validator catches CodecError)."""
    from pymw_magic.codec import MAGIC, CodecError, decode
    with pytest.raises(CodecError, match="malformed"):
        decode(MAGIC + doc + b"\n")


def test_attach_right_after_map_async_in_the_same_process_is_that_job(tmp_path, monkeypatch):
    """No wait between submitting and attaching: the job is this process's
    own, so attach gives it back (never "no job in the job store" while the
    recorder has not written it yet)."""
    import pymw_magic.reattach as reattach
    from pymw_magic import Master
    from pymw_magic.testing.condor import StandInSchedd
    monkeypatch.setenv("PYMW_HOME", str(tmp_path / "home"))
    standin = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    try:
        with Master("condor", schedd=standin, chunksize=1) as m:
            for k in range(8):
                job = m.map_async(abs, [-1, -2, -3], name=f"at-once-{k}")
                assert reattach.attach(f"at-once-{k}") is job
                assert job.result(timeout=120) == [1, 2, 3]
    finally:
        standin.stop()


def test_attach_and_remove_right_after_map_async_take_the_new_job_not_an_older_namesake(tmp_path, monkeypatch):
    import pymw_magic.reattach as reattach
    from pymw_magic import Master, store
    from pymw_magic.testing.condor import StandInSchedd
    monkeypatch.setenv("PYMW_HOME", str(tmp_path / "home"))
    standin = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    try:
        with Master("condor", schedd=standin, chunksize=1) as m:
            old = m.map_async(abs, [-1], name="same-name")
            assert old.result(timeout=120) == [1]
            store.recorder().flush()
            old_uid = store.open_store().job("same-name").uid
            for k in range(4):
                job = m.map_async(abs, [-1, -2], name="same-name")
                assert reattach.attach("same-name") is job
                assert job.result(timeout=120) == [1, 2]
            store.recorder().flush()
            before = {r.uid for r in store.open_store().jobs() if r.name == "same-name"}
            assert len(before) == 5 and old_uid in before
            gate = tmp_path / "never"
            job = m.map_async(by_value(_wait_for), [str(gate)], name="same-name")
            reattach.remove("same-name", cancel=True)
            assert job.done() and job.counts()["cancelled"] == 1
            # the new job's row went, never one of its finished namesakes'
            assert {r.uid for r in store.open_store().jobs() if r.name == "same-name"} == before
    finally:
        standin.stop()


def _wait_for(path):
    import os
    import time
    while not os.path.exists(path):
        time.sleep(0.05)
    return path
