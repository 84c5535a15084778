"""``trusted_results``: what a batch job takes back from its execute nodes.

An HTCondor node holds the job's HMAC key (it must, to read its input), so
it can sign any output.  By default (``trusted_results=False``) results
travel in the safe codec and nothing a node wrote is unpickled: a node that
forges a pickled output cannot run code in the master.  Each test proves it
with a marker file that the forged pickle would create, and shows the same
forgery *does* run with ``trusted_results=True`` (so the test can fail).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

pytest.importorskip("htcondor2")

from conftest import by_value, wait_until  # noqa: E402
import pymw_magic.reattach as reattach  # noqa: E402
from pymw_magic import Master, oneshot, store  # noqa: E402
from pymw_magic.backends.batch import BatchError  # noqa: E402
from pymw_magic.errors import PymwError, TaskFailed  # noqa: E402
from pymw_magic.jobdir import JobDir, OutputCorrupt  # noqa: E402
from condor_fixtures import home, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 180


class _Evil:
    """What a hostile node pickles: unpickling it runs ``touch marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def forged_output(header_of_input: dict, seq: int, marker: str, scheme: str, key: bytes) -> bytes:
    """A signed output claiming the pickle codec, whose result is ``_Evil``."""
    blob = pickle.dumps(_Evil(marker))
    meta = {"outcomes": [[seq, 0, 0.0, 0.0, "", ""]], "blobs": [len(blob)], "error": None}
    body = json.dumps(meta).encode() + b"\n" + blob
    out = {"kind": "output", "codec": "pickle", "job": header_of_input["job"], "index": header_of_input["index"],
           "host": "evil", "python": oneshot.PYTHON}
    return oneshot.seal(out, body, scheme, key)


def forge_other_chunk(root: Path, trusted: bool) -> tuple[JobDir, Path]:
    """The reviewer's repro: the node given chunk 0 (so the key) writes
    chunk 1's output with a pickle that runs code where it is read."""
    jd = JobDir.create(root, f"victim-{trusted}", codec="pickle" if trusted else "safe", trusted_results=trusted)
    jd.write_function(len)
    jd.write_chunk(0, [(0, ("a",), {})])
    jd.write_chunk(1, [(1, ("b",), {})])
    inv = jd.invocation(0)
    scheme, key = oneshot.parse_key(Path(inv.inputs[2]).read_bytes())
    head = dict(oneshot.peek_header(Path(inv.inputs[3]).read_bytes()), index=1)
    marker = root / f"PWNED-{trusted}"
    jd.output_path(1).write_bytes(forged_output(head, 1, str(marker), scheme, key))
    return jd, marker


def test_a_forged_pickle_output_is_never_unpickled_by_default(tmp_path):
    jd, marker = forge_other_chunk(tmp_path, trusted=False)
    assert jd.codec == "safe"
    with pytest.raises(OutputCorrupt) as err:
        jd.read_output(1)
    assert err.value.reason == "unsupported" and "trusted_results=True" in str(err.value)
    assert not marker.exists()
    # opened again (as attach does): the job's codec is read from job.json, not the output
    with pytest.raises(OutputCorrupt):
        JobDir.open(jd.path).read_output(1)
    assert not marker.exists()
    # the same forgery where the user said the nodes are trusted: it runs (why it is opt-in)
    jd2, marker2 = forge_other_chunk(tmp_path, trusted=True)
    jd2.read_output(1)
    assert marker2.exists()


def _hostile_task(x):
    """Runs on the node: forges its own chunk's output (pickled, signed with
    the sandbox's key) and dies before the real worker could overwrite it."""
    import glob
    import json
    import os
    import pickle
    import signal
    from pymw_magic import oneshot
    marker = os.environ["PYMW_TEST_MARKER"]

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    inp = glob.glob("*.in")[0]
    head = oneshot.peek_header(open(inp, "rb").read())
    scheme, key = oneshot.parse_key(open("key", "rb").read())
    blob = pickle.dumps(Evil())
    meta = {"outcomes": [[x, 0, 0.0, 0.0, "", ""]], "blobs": [len(blob)], "error": None}
    body = json.dumps(meta).encode() + b"\n" + blob
    out = {"kind": "output", "codec": "pickle", "job": head["job"], "index": head["index"], "host": "evil",
           "python": oneshot.PYTHON}
    with open(inp[:-3] + ".out", "wb") as f:
        f.write(oneshot.seal(out, body, scheme, key))
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("trusted", [False, True], ids=["default", "trusted_results"])
def test_a_hostile_node_cannot_run_code_in_the_master_by_default(standin, tmp_path, trusted):
    marker = tmp_path / "PWNED"
    with Master("condor", schedd=standin, retries=0, chunksize=1, trusted_results=trusted,
                environment={"PYMW_TEST_MARKER": str(marker)}) as m:
        job = m.map_async(by_value(_hostile_task), [0], name="hostile")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    if trusted:
        # what trusted_results=True means: the node's pickle is loaded (and ran)
        assert marker.exists() and out == [0]
        return
    assert not marker.exists()
    assert isinstance(out[0], BatchError)
    assert "unsupported" in str(out[0]) and "trusted_results=True" in str(out[0])


def test_results_the_safe_codec_cannot_carry_fail_their_task_naming_the_opt_in(standin):
    import numpy as np

    def make():
        PointC = type("Point", (), {"__init__": lambda self, x: setattr(self, "x", x)})
        Oops = type("Oops", (Exception,), {})

        def task(x):
            if x == 1:
                return {1, 2}
            if x == 2:
                return PointC(x)
            if x == 3:
                raise ValueError("three")
            if x == 4:
                raise Oops("custom")
            if x == 5:
                raise KeyError("k")
            return {"x": x, "t": (x, float("inf")), "b": b"\x00", "a": np.arange(3)}
        return task

    with Master("condor", schedd=standin, chunksize=6) as m:
        job = m.map_async(make(), range(6), name="mixed")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert out[0]["t"] == (0, float("inf")) and out[0]["b"] == b"\x00"
    assert out[0]["a"].tolist() == [0, 1, 2]
    for i, tname in ((1, "builtins.set"), (2, "Point")):
        assert isinstance(out[i], TaskFailed), out[i]
        text = str(out[i])
        assert tname in text and "safe result codec" in text and "trusted_results=True" in text
    # a failure comes back as type name, message, traceback; built-in types are made again here
    assert type(out[3]) is ValueError and str(out[3]) == "three"
    assert "in task" in job.tasks[3].remote_traceback and "ValueError: three" in job.tasks[3].remote_traceback
    assert isinstance(out[4], TaskFailed) and "Oops: custom" in str(out[4])
    assert "in task" in str(out[4].__cause__) and "Oops: custom" in str(out[4].__cause__)
    assert type(out[5]) is KeyError and out[5].args == ("k",)


def test_trusted_results_carry_any_object(standin):
    def make():
        PointC = type("PointC", (), {"__init__": lambda self, x: setattr(self, "x", x)})
        Oops = type("Oops", (Exception,), {})

        def task(x):
            if x == 1:
                raise Oops("mine")
            return PointC(x), {x}
        return task

    with Master("condor", schedd=standin, trusted_results=True) as m:
        job = m.map_async(make(), range(3), name="trusted")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert out[0][0].x == 0 and out[0][1] == {0} and out[2][0].x == 2
    assert type(out[1]).__name__ == "Oops"  # (the node's own exception, unpickled)
    assert json.loads((m.backend.job_dir(job) / "job.json").read_text())["codec"] == "pickle"


def _gated(gate):
    def task(x):
        import os
        import time
        while not os.path.exists(gate):
            time.sleep(0.05)
        return {"v": x}
    return task


def _gated_object(gate):
    PointC = type("PointC", (), {"__init__": lambda self, x: setattr(self, "x", x)})

    def task(x):
        import os
        import time
        while not os.path.exists(gate):
            time.sleep(0.05)
        return PointC(x)
    return task


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted_results"])
def test_attach_reads_outputs_with_the_stored_codec(standin, tmp_path, trusted):
    gate = tmp_path / "gate"
    m = Master("condor", schedd=standin, chunksize=1, trusted_results=trusted)
    job = m.map_async(_gated_object(str(gate)) if trusted else _gated(str(gate)), range(3), name=f"att-{trusted}")
    directory = None
    try:
        wait_until(lambda: len(standin.query()) == 3, TIMEOUT, "the 3 procs queued")
        directory = m.backend.job_dir(job)
        store.recorder().flush()
    finally:
        m.detach()
    handle = store.open_store().job(f"att-{trusted}").handle
    assert handle["options"]["trusted_results"] is trusted
    gate.write_text("go")
    wait_until(lambda: len(list((directory / "out").glob("*.out"))) == 3, TIMEOUT, "the 3 outputs written")
    again = reattach.attach(f"att-{trusted}")
    try:
        out = again.result(timeout=TIMEOUT)
    finally:
        again.master.shutdown(wait=True)
    if trusted:
        assert [o.x for o in out] == [0, 1, 2]
        assert again.master.backend.trusted_results is True
    else:
        assert out == [{"v": 0}, {"v": 1}, {"v": 2}]
        assert again.master.backend.trusted_results is False


def test_attach_of_a_trusted_job_refuses_a_safe_override(standin, tmp_path):
    gate = tmp_path / "gate"
    m = Master("condor", schedd=standin, chunksize=1, trusted_results=True)
    m.map_async(_gated_object(str(gate)), range(2), name="trusted-job")
    try:
        wait_until(lambda: len(standin.query()) == 2, TIMEOUT, "the procs queued")
        store.recorder().flush()
    finally:
        m.detach()
    try:
        with pytest.raises(PymwError, match=r"trusted_results=True"):
            reattach.attach("trusted-job", trusted_results=False)
    finally:
        gate.write_text("go")
    again = reattach.attach("trusted-job")
    try:
        assert [o.x for o in again.result(timeout=TIMEOUT)] == [0, 1]
    finally:
        again.master.shutdown(wait=True)
