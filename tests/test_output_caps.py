"""What a host we do not control can make the master hold in memory.

Two limits, each tested against a hostile node and against large
legitimate results:

* ``max_output_mb`` (every batch backend, declared once in
  ``backends/batch.py``): an output file over it is refused by its size,
  unread, and fails only its chunk's tasks, with an error naming the file,
  its size, the cap and how to raise it; attach reads with the stored cap;
* the safe codec's decode budget (``codec.MAX_DECODED``, one budget per
  output): JSON such as ``[[],[],...]`` is refused before it is parsed,
  while lists of numbers, dicts, strings and arrays of any size decode.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pytest

pytest.importorskip("htcondor2")

from conftest import by_value, wait_until  # noqa: E402
import pymw_magic.reattach as reattach  # noqa: E402
from pymw_magic import Master, codec, oneshot, store  # noqa: E402
from pymw_magic.backends import get_backend  # noqa: E402
from pymw_magic.backends.batch import BATCH_OPTIONS, MAX_OUTPUT_MB, BatchError  # noqa: E402
from pymw_magic.jobdir import JobDir, OutputTooLarge  # noqa: E402
from pymw_magic.magics import usage_text  # noqa: E402
from condor_fixtures import home, schedd, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 180
MiB = 1 << 20


# --- the option ------------------------------------------------------------------------------------
def test_every_batch_backend_declares_the_one_output_cap():
    for name in ("condor", "boinc"):
        assert get_backend(name).options["max_output_mb"] is BATCH_OPTIONS["max_output_mb"]
    assert BATCH_OPTIONS["max_output_mb"].default == MAX_OUTPUT_MB == 64
    text = usage_text()
    for name in ("condor", "boinc"):
        section = re.search(rf"\n  {name}\n((?:    .*\n?)+)", text).group(1)
        assert "--max-output-mb" in section and "(default 64.0)" in section, section


@pytest.mark.parametrize("bad", [0, -1, True, "lots", float("nan")])
def test_a_bad_output_cap_is_refused_naming_the_option(standin, bad):
    with pytest.raises(ValueError, match="max_output_mb"):
        Master("condor", schedd=standin, max_output_mb=bad)


def test_the_cap_is_given_in_mib_and_may_be_text(standin):
    with Master("condor", schedd=standin, max_output_mb="2.5") as m:
        assert m.backend.max_output_bytes == int(2.5 * MiB)
        assert m.backend.backend_options["max_output_mb"] == 2.5


# --- a hostile HTCondor node ---------------------------------------------------------------------
def _huge_output_task(counter, size):
    def task(x):
        import glob
        import os
        import signal
        with open(counter, "a") as f:
            f.write(f"{x}\n")
        if x != 1:
            return x
        # the node's own output file, as big as it likes (sparse: no disk here), then it dies
        inp = glob.glob("*.in")[0]
        with open(inp[:-3] + ".out", "wb") as f:
            f.truncate(size)
        os.kill(os.getpid(), signal.SIGKILL)
    return task


def _too_large(err: BaseException, cap_mb: float) -> tuple[Path, int]:
    """The file and size the error names, checked against the file on disk."""
    text = str(err)
    m = re.search(r"output file (\S+\.out) is (\d+) bytes, over the cap of (\d+) bytes", text)
    assert m, text
    assert int(m.group(3)) == int(cap_mb * MiB)
    assert f"max_output_mb={cap_mb:g}" in text and "--max-output-mb" in text and "was not read" in text, text
    path, size = Path(m.group(1)), int(m.group(2))
    assert path.stat().st_size == size > int(m.group(3))
    return path, size


def test_an_oversize_output_fails_its_chunk_only_and_is_not_retried(standin, tmp_path):
    counter = tmp_path / "ran"
    size = 3 * MiB
    with Master("condor", schedd=standin, chunksize=1, retries=2, max_output_mb=1) as m:
        job = m.map_async(by_value(_huge_output_task(str(counter), size)), range(4), name="huge")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert out[0] == 0 and out[2] == 2 and out[3] == 3, out
        assert isinstance(out[1], BatchError), out[1]
        _, got = _too_large(out[1], 1)
        assert got == size
        # the same tasks would write the same file: it ran once, never resubmitted
        assert counter.read_text().split().count("1") == 1
        # the master goes on
        assert m.map_async(by_value(lambda x: x * 10), range(3), name="after").result(timeout=TIMEOUT) == [0, 10, 20]


def test_an_output_far_over_the_cap_comes_back_cut_at_the_transfer_limit_and_unread(schedd, home, tmp_path):
    # max_transfer_output_mb (max_output_mb + 16 MiB for stdout/stderr) makes
    # HTCondor hold the proc instead of sending the whole huge file back.
    from pymw_magic.backends.condor import HOLD_OUTPUT_TOO_LARGE, STD_FILES_MB, JobHeld
    counter = tmp_path / "ran"
    size = (1 + STD_FILES_MB + 8) * MiB
    with Master("condor", schedd=schedd, chunksize=1, retries=2, max_output_mb=1) as m:
        job = m.map_async(by_value(_huge_output_task(str(counter), size)), range(3), name="far")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert out[0] == 0 and out[2] == 2, out
    err = out[1]
    assert isinstance(err, JobHeld) and err.hold_reason_code == HOLD_OUTPUT_TOO_LARGE, repr(err)
    text = str(err)
    assert "max total download bytes exceeded" in text and "max_output_mb=1 + 16 MiB" in text \
        and "--max-output-mb 2" in text, text
    assert counter.read_text().split().count("1") == 1      # held, not run again
    # what came back of it stops at max_transfer_output_mb (HTCondor sends the
    # file up to there), and it was not read: far less than the node wrote
    big = [p.stat().st_size for p in home.rglob("*") if p.is_file() and p.stat().st_size > MiB]
    assert big and all(n <= (1 + STD_FILES_MB) * MiB < size for n in big), big


def test_a_legitimate_big_result_needs_the_cap_raised(standin):
    big = by_value(lambda n: "x" * n)
    with Master("condor", schedd=standin, chunksize=1, retries=0, max_output_mb=0.5) as m:
        out = m.map_async(big, [10, 2 * MiB], name="big").result(timeout=TIMEOUT, return_exceptions=True)
    assert out[0] == "x" * 10
    _too_large(out[1], 0.5)
    with Master("condor", schedd=standin, chunksize=1) as m:  # (the default cap, 64 MiB)
        assert m.map_async(big, [2 * MiB], name="big2").result(timeout=TIMEOUT) == ["x" * (2 * MiB)]


def _gated_big(gate):
    def task(n):
        import os
        import time
        while not os.path.exists(gate):
            time.sleep(0.05)
        return "y" * n
    return task


def test_attach_reads_with_the_stored_cap_or_the_one_given(standin, tmp_path):
    gate = tmp_path / "gate"
    m = Master("condor", schedd=standin, chunksize=1, max_output_mb=1)
    m.map_async(by_value(_gated_big(str(gate))), [2 * MiB], name="capped")
    m.map_async(by_value(_gated_big(str(gate))), [2 * MiB], name="raised")
    try:
        wait_until(lambda: len(standin.query()) == 2, TIMEOUT, "the 2 procs queued")
        store.recorder().flush()
    finally:
        m.detach()
    handles = [store.open_store().job(name).handle for name in ("capped", "raised")]
    assert [h["options"]["max_output_mb"] for h in handles] == [1.0, 1.0]
    gate.write_text("go")
    wait_until(lambda: all(list((Path(h["dir"]) / "out").glob("*.out")) for h in handles), TIMEOUT,
               "the 2 outputs written")
    again = reattach.attach("capped")
    try:
        [err] = again.result(timeout=TIMEOUT, return_exceptions=True)
        assert again.master.backend.max_output_bytes == MiB
    finally:
        again.master.shutdown(wait=True)
    _too_large(err, 1)
    raised = reattach.attach("raised", max_output_mb=4)
    try:
        assert raised.result(timeout=TIMEOUT) == ["y" * (2 * MiB)]
    finally:
        raised.master.shutdown(wait=True)


# --- the read itself --------------------------------------------------------------------------------
def test_a_huge_file_is_refused_by_its_size_before_a_byte_is_read(tmp_path):
    jd = JobDir.create(tmp_path, "sparse", codec="safe")
    jd.write_function(len)
    jd.write_chunk(0, [(0, ("a",), {})])
    with open(jd.output_path(0), "wb") as f:
        f.truncate(8 << 30)  # (sparse: 8 GiB on no disk)
    tracemalloc.start()
    try:
        for _ in range(20):
            with pytest.raises(OutputTooLarge) as err:
                jd.read_output(0, max_bytes=64 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.size == 8 << 30 and err.value.cap == 64 * MiB and err.value.reason == "too large"
    assert str(jd.output_path(0)) in str(err.value)
    assert peak < MiB, peak


# --- the codec's decode budget -------------------------------------------------------------------
def _doc(json_value: bytes) -> bytes:
    return codec.MAGIC + b'{"v":' + json_value + b',"a":[]}\n'


@pytest.mark.parametrize("element", [b"[]", b"{}", b"[[]]", b"[0]", b'{"":0}', b'{"a":[]}', b'{"$t":[[]]}'])
def test_container_amplification_is_refused_before_parsing(element):
    n = 32 * MiB // (len(element) + 1)  # (a file the default output cap takes)
    data = _doc(b"[" + b",".join([element] * n) + b"]")
    tracemalloc.start()
    try:
        with pytest.raises(codec.CodecError) as err:
            codec.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(err.value)
    assert "pymw_magic.codec.MAX_DECODED" in text and f"over the limit of {codec.MAX_DECODED} bytes" in text, text
    assert peak < MiB, peak  # (nothing parsed: the brackets were counted)


def test_large_legitimate_values_decode():
    import numpy as np
    values = [
        [float(i) + 0.5 for i in range(1_000_000)],
        {f"k{i}": i for i in range(100_000)},
        [(i, i + 1) for i in range(100_000)],
        [[i, i + 1] for i in range(1_000_000)],      # (~88 MB of lists)
        ["[{" * 5_000_000, "]}" * 1000],            # (brackets in strings do not count)
        [{"x": i, "y": [i]} for i in range(100_000)],
        np.arange(6_000_000, dtype=np.float64),      # (arrays are never counted)
    ]
    for v in values:
        got = codec.decode(codec.encode(v))
        if isinstance(v, np.ndarray):
            assert np.array_equal(got, v)
        else:
            assert got == v


def test_the_budget_is_the_limit_named_and_can_be_raised(monkeypatch):
    value = [[] for _ in range(10_000)]
    data = codec.encode(value)
    monkeypatch.setattr(codec, "MAX_DECODED", 100_000)
    with pytest.raises(codec.CodecError, match=r"over the limit of 100000 bytes \(pymw_magic.codec.MAX_DECODED\)"):
        codec.decode(data)
    monkeypatch.setattr(codec, "MAX_DECODED", 10 << 20)
    assert codec.decode(data) == value


def test_brackets_in_strings_are_forgiven_up_to_a_count_of_strings(monkeypatch):
    """Brackets inside strings are no containers: left out while the
    strings are few enough to scan one by one; past that the quick count
    (which counts them) decides, so the scan never costs seconds."""
    value = ["[[{{"] * 1000
    data = codec.encode(value)
    monkeypatch.setattr(codec, "MAX_DECODED", 10_000)   # (4000 brackets counted: far over)
    assert codec.decode(data) == value
    monkeypatch.setattr(codec, "MAX_EXACT_STRINGS", 999)
    with pytest.raises(codec.CodecError, match="MAX_DECODED"):
        codec.decode(data)


def _forged(jd: JobDir, index: int, seqs: list[int], blobs: list[bytes]) -> bytes:
    inv = jd.invocation(index)
    scheme, key = oneshot.parse_key(Path(inv.inputs[2]).read_bytes())
    meta = {"outcomes": [[s, i, 0.0, 0.0, "", ""] for i, s in enumerate(seqs)],
            "blobs": [len(b) for b in blobs], "error": None}
    body = json.dumps(meta).encode() + b"\n" + b"".join(blobs)
    out = {"kind": "output", "codec": "safe", "job": jd.job_id, "index": index, "host": "node",
           "python": oneshot.PYTHON}
    return oneshot.seal(out, body, scheme, key)


def test_one_output_shares_one_budget_among_its_values(tmp_path, monkeypatch):
    """Many values each under the limit cannot add up past it: the later
    ones fail (naming the output's budget), the earlier ones are kept."""
    from pymw_magic import jobdir
    monkeypatch.setattr(codec, "MAX_DECODED", 1 << 20)
    monkeypatch.setattr(jobdir, "DECODED_PER_BYTE", 1)   # (the budget: max(MAX_DECODED, 1 x the cap))
    jd = JobDir.create(tmp_path, "shared", codec="safe")
    jd.write_function(len)
    seqs = list(range(4))
    jd.write_chunk(0, [(s, ("a",), {}) for s in seqs])
    hostile = codec.encode([[] for _ in range(5000)])      # ~440 KB of lists: two fit in 1 MiB
    jd.output_path(0).write_bytes(_forged(jd, 0, seqs, [hostile] * 4))
    out = jd.read_output(0, max_bytes=700_000)              # (the budget: 1 MiB)
    ok = [o.ok for o in out.outcomes]
    assert ok == [True, True, False, False], ok
    why = out.outcomes[2].failure[2]
    assert "decode budget of output file 0.out" in why and "max_output_mb" in why, why
    # a bigger cap is a bigger budget
    out = jd.read_output(0, max_bytes=4 << 20)
    assert all(o.ok for o in out.outcomes)
    # legitimate values of the same size all decode
    plain = codec.encode([float(i) for i in range(20000)])
    jd.output_path(0).write_bytes(_forged(jd, 0, seqs, [plain] * 4))
    assert all(o.ok for o in jd.read_output(0, max_bytes=700_000).outcomes)


@pytest.mark.parametrize("trial", range(3))
def test_decoding_under_threads_keeps_each_budget_apart(trial):
    """Budgets are per call: many threads decoding at once never charge
    one another (a shared global would refuse legitimate values)."""
    import threading
    value = [[i, i] for i in range(50_000)]
    data = codec.encode(value)
    errors: list[BaseException] = []

    def run():
        try:
            for _ in range(3):
                assert codec.decode(data) == value
        except BaseException as exc:  # (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors


# --- BOINC: the same cap on fetch ------------------------------------------------------------------
@pytest.fixture
def boinc_project(tmp_path, monkeypatch):
    from pymw_magic.testing.boinc import StandInProject
    monkeypatch.setenv("PYMW_CONFIG", str(tmp_path / "config"))  # (the test's own signing key)
    p = StandInProject(tmp_path / "project", hosts=1, idle_timeout=300).create()
    yield p
    pid = p.daemon_pid()
    p.stop()
    if pid is not None:
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or
                   Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                   60, "the stand-in daemon gone")


def test_boinc_takes_no_output_over_the_shared_cap(boinc_project):
    """Under BOINC's own max_nbytes (64 MiB) but over max_output_mb: the
    result stays in the project, unread, and only its task fails."""
    with Master("boinc", project_home=str(boinc_project.root), chunksize=1, retries=0, max_error_results=1,
                max_output_mb=0.25) as m:
        assert m.backend.max_output_bytes == MiB // 4
        job = m.map_async(by_value(lambda n: "z" * n), [10, MiB], name="boinc-big")
        out = job.result(timeout=TIMEOUT + 60, return_exceptions=True)
    assert out[0] == "z" * 10
    text = str(out[1])
    assert isinstance(out[1], BatchError) and "max_output_mb=0.25" in text and "--max-output-mb" in text, text
    m2 = re.search(r"output file (\S+\.out) is (\d+) bytes, over the cap of 262144 bytes", text)
    assert m2 and int(m2.group(2)) > MiB, text
    assert "pymw_results" in m2.group(1)  # (refused where BOINC put it: never copied)
