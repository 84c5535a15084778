"""The stand-in schedd (pymw_magic.testing.condor) behaves as an HTCondor
schedd does: real procs in fresh sandboxes, file transfer both ways, holds,
releases, removals, evictions and policies, and an event log that the real
``htcondor2.JobEventLog`` reads back — every test checks the log that way.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

htcondor2 = pytest.importorskip("htcondor2")
classad2 = pytest.importorskip("classad2")

from conftest import ROOT, wait_until  # noqa: E402
from htcondor2 import JobAction, JobEventType as T  # noqa: E402

from pymw_magic.testing import _condor_submit as sub  # noqa: E402
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402

PY = sys.executable


# -- helpers -------------------------------------------------------------------------------------

def job_processes(root: Path) -> list[int]:
    """Live processes started by the stand-in of ``root`` (their sandbox is
    under root, or they are its daemon)."""
    marker = f"_CONDOR_SCRATCH_DIR={root}"
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or ())
            if "pymw_magic.testing._condor_daemon" in cmd and str(root) in cmd:
                out.append(p.pid)
                continue
            env = p.environ()
            if env.get("_CONDOR_SCRATCH_DIR", "").startswith(str(root)) or marker in env:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


class Log:
    """Follows one event log with the real htcondor2.JobEventLog."""

    def __init__(self, path: Path):
        wait_until(path.exists, timeout=30, what=f"the event log {path}")
        self.path = path
        self.jel = htcondor2.JobEventLog(str(path))
        self.events: list = []
        self.counts: dict[tuple, int] = {}

    def until(self, predicate, timeout: float = 60.0, what: str = "events"):
        """Read events until ``predicate(log)`` holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got "
                                     f"{[(int(e.type), e.cluster, e.proc) for e in self.events[-50:]]}")
            for e in self.jel.events(stop_after=1):
                self.events.append(e)
                t, c = int(e.type), e.cluster
                self.counts[(t, c)] = self.counts.get((t, c), 0) + 1
                self.counts[(t, None)] = self.counts.get((t, None), 0) + 1
                if predicate(self):
                    break
        return self.events

    def n(self, t, cluster=None) -> int:
        return self.counts.get((int(t), cluster), 0)

    def of(self, cluster: int, proc: int) -> list:
        return [e for e in self.events if e.cluster == cluster and e.proc == proc]

    def types(self, cluster: int, proc: int, skip=(T.FILE_TRANSFER,)) -> list:
        return [e.type for e in self.of(cluster, proc) if e.type not in skip]


def count(t, cluster=None, n=1):
    """A predicate for Log.until: at least n events of type t (of cluster)."""
    return lambda log: log.n(t, cluster) >= n


def sh(script: str, **extra) -> dict:
    """A submit description running /bin/sh -c script (new arguments syntax)."""
    # the new syntax: double quotes around it all, a double quote inside written twice
    quoted = script.replace("'", "''").replace('"', '""')
    d = {"executable": "/bin/sh", "arguments": f"\"-c '{quoted}'\"",
         "should_transfer_files": "YES", "when_to_transfer_output": "ON_EXIT_OR_EVICT", "log": "events.log"}
    d.update(extra)
    return d


@pytest.fixture
def jobdir(tmp_path):
    d = tmp_path / "job dir"
    d.mkdir()
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


@pytest.fixture
def schedd(tmp_path):
    root = tmp_path / "schedd root"
    s = StandInSchedd(root, slots=2, idle_timeout=300)
    yield s
    s.stop()
    wait_until(lambda: not job_processes(root), timeout=15, what="no process of the stand-in left")


# -- a cluster from itemdata: the milestone --------------------------------------------------------

def test_itemdata_cluster_runs_in_sandboxes_and_logs_htcondor_events(schedd, jobdir):
    (jobdir / "data.txt").write_text("payload\n")
    (jobdir / "sub").mkdir()
    (jobdir / "sub" / "more.txt").write_text("more\n")
    desc = htcondor2.Submit(sh(
        'pwd > where_$(x).txt; cat data.txt more.txt > copy_$(x).txt; echo "$GREETING $(ClusterId).$(ProcId)"; '
        'echo oops >&2; test "$(Cluster).$(Process)" = "$(ClusterId).$(ProcId)" || exit 99; exit $(code)',
        transfer_input_files="data.txt, sub/more.txt", transfer_output_files="where_$(x).txt, copy_$(x).txt",
        transfer_output_remaps='"copy_$(x).txt = results/copy-$(x).out"',
        environment="\"GREETING='hello world' OTHER=1\"", output="out.$(ProcId)", error="err.$(ProcId)",
        submit_event_notes="chunk $(x)", request_cpus="1", request_memory="1GB", request_disk="2MB",
    ))
    (jobdir / "results").mkdir()
    result = schedd.submit(desc, itemdata=iter([{"x": "a", "code": "0"}, {"x": "b", "code": "3"},
                                                {"x": "c", "code": "0"}]))
    assert isinstance(result, htcondor2.SubmitResult)
    assert (result.num_procs(), result.first_proc()) == (3, 0)
    cid = result.cluster()
    assert int(result) == cid and isinstance(result.clusterad(), classad2.ClassAd)

    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, cid, 3), what="three terminations")
    for p, code in ((0, 0), (1, 3), (2, 0)):
        assert log.types(cid, p) == [T.SUBMIT, T.EXECUTE, T.JOB_TERMINATED]
        submit, execute, term = [e for e in log.of(cid, p) if e.type != T.FILE_TRANSFER]
        assert submit["LogNotes"] == f"chunk {'abc'[p]}"
        assert execute["ExecuteHost"].startswith("<") and execute["SlotName"].startswith("slot1_")
        assert term["TerminatedNormally"] is True and term["ReturnValue"] == code
        assert (jobdir / f"out.{p}").read_text() == f"hello world {cid}.{p}\n"
        assert (jobdir / f"err.{p}").read_text() == "oops\n"
        assert (jobdir / "results" / f"copy-{'abc'[p]}.out").read_text() == "payload\nmore\n"
        where = Path((jobdir / f"where_{'abc'[p]}.txt").read_text().strip())
        # a fresh scratch directory of the schedd's, never the job's initialdir
        assert where != jobdir and str(where).startswith(str(schedd.root / "execute"))
        assert not where.exists(), "the sandbox outlived its proc"
    assert not (jobdir / "copy_a.txt").exists(), "a remapped output also landed under its own name"
    assert schedd.query(f"ClusterId == {cid}") == []
    hist = {a["ProcId"]: a for a in schedd.history(f"ClusterId == {cid}", ["ProcId", "ExitCode", "JobStatus",
                                                                           "RequestMemory", "RequestDisk"])}
    assert {p: (a["ExitCode"], a["JobStatus"]) for p, a in hist.items()} == {0: (0, 4), 1: (3, 4), 2: (0, 4)}
    assert hist[0]["RequestMemory"] == 1024 and hist[0]["RequestDisk"] == 2048


def test_query_shows_the_queue_with_classad_constraints_and_projection(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 60", submit_event_notes="n$(ProcId)")), count=3)
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid, 2), what="two procs running (two slots)")
    ads = schedd.query(f"ClusterId == {cid}", ["ProcId", "JobStatus", "RemoteHost"])
    assert all(isinstance(a, classad2.ClassAd) for a in ads)
    status = {a["ProcId"]: a["JobStatus"] for a in ads}
    assert sorted(status.values()) == [1, 2, 2], "two slots: two running, one idle"
    assert set(ads[0].keys()) <= {"ProcId", "JobStatus", "RemoteHost"}
    running = schedd.query(f"ClusterId == {cid} && JobStatus == 2", ["ProcId", "RemoteHost", "NumJobStarts"])
    assert len(running) == 2 and all(a["RemoteHost"].startswith("slot1_") for a in running)
    assert len(schedd.query("true", [], limit=1)) == 1
    full = schedd.query(f"ClusterId == {cid} && ProcId == 0")[0]
    for attr in ("ClusterId", "ProcId", "JobStatus", "Iwd", "UserLog", "EnteredCurrentStatus", "QDate",
                 "Owner", "Cmd", "Arguments", "RequestCpus", "RequestMemory", "RequestDisk",
                 "SubmitEventNotes"):
        assert attr in full, attr
    assert full["Iwd"] == str(jobdir) and full["UserLog"] == str(jobdir / "events.log")
    assert schedd.query("ClusterId == 999999") == []
    with pytest.raises(htcondor2.HTCondorException):
        schedd.query("ClusterId ==")
    out = schedd.act(JobAction.Remove, cid)
    assert out["TotalSuccess"] == 3
    log.until(count(T.JOB_ABORTED, cid, 3), what="three aborts")


# -- holds: missing inputs, policies, the user --------------------------------------------------------

def test_missing_input_holds_with_htcondor_reason_then_release_runs_it(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("cat does_not_exist.dat", transfer_input_files="does_not_exist.dat")))
    cid = r.cluster()
    t0 = time.monotonic()
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_HELD, cid), timeout=60, what="the hold")
    assert time.monotonic() - t0 < 20   # (at its first start; the margin is for a loaded machine)
    assert log.types(cid, 0) == [T.SUBMIT, T.REMOTE_ERROR, T.JOB_EVICTED, T.JOB_HELD]
    err, evicted, held = log.of(cid, 0)[1:]
    assert (err["HoldReasonCode"], err["HoldReasonSubCode"]) == (13, 2)
    assert "Failed to transfer files" in err["ErrorMsg"]
    assert (evicted["ReasonCode"], evicted["ReasonSubCode"]) == (13, 2)
    missing = jobdir / "does_not_exist.dat"
    assert held["HoldReasonCode"] == 13 and held["HoldReasonSubCode"] == 2
    assert held["HoldReason"].startswith("Transfer input files failure at access point ")
    assert held["HoldReason"].endswith(
        f"Details: 1 total failures: first failure: reading from file {missing}: "
        "(errno 2) No such file or directory")
    (ad,) = schedd.query(f"ClusterId == {cid}", ["JobStatus", "HoldReason", "HoldReasonCode",
                                                 "HoldReasonSubCode"])
    assert (ad["JobStatus"], ad["HoldReasonCode"], ad["HoldReasonSubCode"]) == (5, 13, 2)
    assert ad["HoldReason"] == held["HoldReason"]

    missing.write_text("now here\n")
    out = schedd.act(JobAction.Release, f"{cid}.0", reason="fixed it")
    assert out["TotalSuccess"] == 1
    log.until(count(T.JOB_TERMINATED, cid), what="the run after release")
    types = log.types(cid, 0)
    assert types[4:] == [T.JOB_RELEASED, T.EXECUTE, T.JOB_TERMINATED]
    assert [e for e in log.of(cid, 0) if e.type == T.JOB_RELEASED][0]["Reason"].startswith("fixed it")
    # release of a job that is not held is a bad status, as on a schedd
    r2 = schedd.submit(htcondor2.Submit(sh("sleep 60")))
    log.until(count(T.EXECUTE, r2.cluster()), what="the second job running")
    bad = schedd.act(JobAction.Release, r2.cluster())
    assert (bad["TotalSuccess"], bad["TotalBadStatus"]) == (0, 1)
    schedd.act(JobAction.Remove, r2.cluster())
    log.until(count(T.JOB_ABORTED, r2.cluster()), what="the removal")


def test_allowed_execute_duration_holds_with_code_47(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 60", allowed_execute_duration="1")))
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_HELD, r.cluster()), timeout=30, what="the duration hold")
    held = [e for e in log.events if e.type == T.JOB_HELD][0]
    assert (held["HoldReasonCode"], held["HoldReasonSubCode"]) == (47, 0)
    assert held["HoldReason"] == "The job exceeded allowed execute duration of 00:01"
    assert T.JOB_TERMINATED not in log.types(r.cluster(), 0)
    wait_until(lambda: not schedd.running(), timeout=30, what="the process killed")
    assert sub.format_time_short(3661) == "1:01:01" and sub.format_time_short(65) == "01:05"


def test_on_exit_hold_is_evaluated_in_the_job_ad(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("exit $(code)", on_exit_hold="ExitCode =!= 0",
                                          on_exit_hold_subcode="7")),
                      itemdata=iter([{"code": "0"}, {"code": "4"}]))
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(lambda ev: count(T.JOB_TERMINATED, cid)(ev) and count(T.JOB_HELD, cid)(ev), what="end and hold")
    assert log.types(cid, 0)[-1] == T.JOB_TERMINATED
    assert log.types(cid, 1)[-1] == T.JOB_HELD
    held = log.of(cid, 1)[-1]
    assert (held["HoldReasonCode"], held["HoldReasonSubCode"]) == (3, 7)
    assert held["HoldReason"] == "The job attribute OnExitHold expression 'ExitCode =!= 0' evaluated to TRUE"
    (ad,) = schedd.query(f"ClusterId == {cid}", ["ExitCode", "JobStatus"])
    assert (ad["ExitCode"], ad["JobStatus"]) == (4, 5)
    schedd.act(JobAction.Remove, cid)


def test_user_hold_of_a_running_proc_then_release(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 60")))
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid), what="running")
    pid = schedd.running()[f"{cid}.0"]
    out = schedd.act(JobAction.Hold, [f"{cid}.0"], reason="pause")
    assert out["TotalSuccess"] == 1
    log.until(count(T.JOB_HELD, cid), what="the hold")
    assert log.types(cid, 0) == [T.SUBMIT, T.EXECUTE, T.JOB_EVICTED, T.JOB_HELD]
    held = log.of(cid, 0)[-1]
    assert held["HoldReason"].startswith("pause (by user ") and held["HoldReasonCode"] == 1
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               timeout=10, what="the held proc's process gone")
    assert schedd.act(JobAction.Hold, cid)["TotalAlreadyDone"] == 1
    schedd.act(JobAction.Release, cid)
    log.until(count(T.EXECUTE, cid, 2), what="running again")
    (ad,) = schedd.query(f"ClusterId == {cid}", ["NumJobStarts", "NumHolds"])
    assert (ad["NumJobStarts"], ad["NumHolds"]) == (2, 1)
    schedd.act(JobAction.Remove, cid)
    log.until(count(T.JOB_ABORTED, cid), what="the removal")


# -- removal ---------------------------------------------------------------------------------------

def test_remove_of_running_proc_evicts_then_aborts_and_kills_it(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 60 & sleep 60; wait")), count=3)
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid, 2), what="two running")
    pids = list(schedd.running().values())
    tree = [c.pid for p in pids for c in psutil.Process(p).children(recursive=True)] + pids
    out = schedd.act(JobAction.Remove, f"ClusterId == {cid}")
    assert (out["TotalSuccess"], out["TotalNotFound"], out["TotalJobAds"]) == (3, 0, 3)
    assert isinstance(out, classad2.ClassAd)
    log.until(count(T.JOB_ABORTED, cid, 3), what="three aborts")
    for p in range(3):
        types = log.types(cid, p)
        if T.EXECUTE in types:
            assert types == [T.SUBMIT, T.EXECUTE, T.JOB_EVICTED, T.JOB_ABORTED]
            ev = log.of(cid, p)[-2]
            assert ev["Reason"] == "Claim deactivated" and ev["ReasonCode"] == 1009
        else:
            assert types == [T.SUBMIT, T.JOB_ABORTED]
        assert log.of(cid, p)[-1]["Reason"].startswith("Python-initiated action (by user ")
    wait_until(lambda: not [p for p in tree if psutil.pid_exists(p)
                            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
               timeout=10, what="the procs and their children killed")
    assert schedd.query(f"ClusterId == {cid}") == []
    assert {a["JobStatus"] for a in schedd.history(f"ClusterId == {cid}", ["JobStatus"])} == {3}
    # twice: nothing left to find
    again = schedd.act(JobAction.Remove, f"{cid}.0")
    assert (again["TotalSuccess"], again["TotalNotFound"]) == (0, 1)
    assert schedd.act(JobAction.Remove, cid)["TotalJobAds"] == 0


def test_act_on_unknown_ids_and_bad_specs(schedd, jobdir):
    out = schedd.act(JobAction.Remove, ["4242.0", "4242.1"])
    assert (out["TotalNotFound"], out["TotalSuccess"]) == (2, 0)
    assert schedd.act(JobAction.Hold, 4242)["TotalSuccess"] == 0
    with pytest.raises(TypeError):
        schedd.act("Remove", "1.0")
    with pytest.raises(ValueError):
        schedd.act(JobAction.Remove, "not ((( an expression")
    with pytest.raises(TypeError):
        schedd.act(JobAction.Remove, 1.5)
    with pytest.raises(ValueError):
        schedd.act(JobAction.Remove, ["1.0", "x"])


# -- submit validation, as htcondor2 does it ---------------------------------------------------------

def test_submit_refuses_what_htcondor2_refuses(schedd, jobdir):
    d = htcondor2.Submit(sh("true"))
    with pytest.raises(TypeError):
        schedd.submit({"executable": "/bin/true"})
    with pytest.raises(ValueError):
        schedd.submit(d, queue="3", itemdata=iter([{"a": "1"}]))
    with pytest.raises(ValueError):
        schedd.submit(d, itemdata=iter([{"a": "x\ny"}]))
    with pytest.raises(TypeError):
        schedd.submit(d, itemdata=iter([3]))
    with pytest.raises(htcondor2.HTCondorException, match="Executable file .* does not exist"):
        schedd.submit(htcondor2.Submit({"executable": "no_such_program", "log": "events.log"}))
    with pytest.raises(htcondor2.HTCondorException, match="Parse error"):
        schedd.submit(htcondor2.Submit(sh("true", on_exit_hold="ExitCode ==")))
    # only the first dict's keys count, missing ones expand empty
    r = schedd.submit(d, itemdata=iter([{"a": "1"}, {"a": "2", "b": "ignored"}, {}]))
    assert r.num_procs() == 3
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, r.cluster(), 3), what="three runs")
    # queue= with an IN list (the bindings read it as condor_submit does), and count=
    r2 = schedd.submit(htcondor2.Submit(sh("echo $(v) > v_$(v).txt", transfer_output_files="v_$(v).txt")),
                       queue="v in (p, q)")
    r3 = schedd.submit(d, count=2)
    assert (r2.num_procs(), r3.num_procs()) == (2, 2)
    log.until(lambda ev: count(T.JOB_TERMINATED, r2.cluster(), 2)(ev)
              and count(T.JOB_TERMINATED, r3.cluster(), 2)(ev), what="the other clusters")
    assert (jobdir / "v_q.txt").read_text() == "q\n"


def test_arguments_old_and_new_syntax_and_environment():
    assert sub.parse_arguments('"a \'b c\' \'it\'\'s\' ""q"""') == ["a", "b c", "it's", '"q"']
    assert sub.parse_arguments("one two  three") == ["one", "two", "three"]
    assert sub.parse_arguments('x \\"y\\"') == ["x", '"y"']
    with pytest.raises(ValueError):
        sub.parse_arguments('a "b c"')
    with pytest.raises(ValueError, match="unescaped double quote"):
        sub.parse_arguments('"a "b" c"')
    assert sub.parse_environment("\"A=1 B='x y' C=\"") == {"A": "1", "B": "x y", "C": ""}
    assert sub.parse_environment("A=1;B=2") == {"A": "1", "B": "2"}
    assert sub.v2_join(["a", "b c", "it's"]) == "a 'b c' 'it''s'"
    assert sub.parse_arguments('"' + sub.v2_join(["a", "b c", "", "it's"]) + '"') == ["a", "b c", "", "it's"]
    assert sub.size_in("2GB", 1024, 0) == 2048 and sub.size_in("100", 1024, 0) == 100
    assert sub.size_in("1G", 1, 0) == 1048576


def test_executable_on_path_and_old_argument_syntax(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit({
        "executable": "python3", "transfer_executable": "false",
        "arguments": "-c print(123)", "output": "py.out", "log": "events.log",
        "should_transfer_files": "YES",
    }))
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, r.cluster()), what="python3 from PATH")
    assert log.events[-1]["ReturnValue"] == 0
    assert (jobdir / "py.out").read_text() == "123\n"
    # a program that is nowhere: held as HTCondor holds a failed exec
    r2 = schedd.submit(htcondor2.Submit({"executable": "no-such-program-xyz", "transfer_executable": "false",
                                         "log": "events.log"}))
    log.until(count(T.JOB_HELD, r2.cluster()), what="the exec failure hold")
    held = log.events[-1]
    assert held["HoldReasonCode"] == 6 and held["HoldReasonSubCode"] == 2
    assert "Failed to execute" in held["HoldReason"]
    schedd.act(JobAction.Remove, r2.cluster())


# -- faults a test injects -----------------------------------------------------------------------------

def test_injected_hold_evict_and_exit(schedd, jobdir):
    schedd.inject_fault("hold", proc=0, reason="the disk is gone", code=26, subcode=4)
    schedd.inject_fault("evict", proc=1, reason="Claim preempted", code=1009)
    schedd.inject_fault("exit", proc=2, exit_code=9)
    r = schedd.submit(htcondor2.Submit(sh("echo run >> runs.txt; echo $(ProcId) > o$(ProcId).txt",
                                          transfer_output_files="o$(ProcId).txt")), count=4)
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(lambda ev: count(T.JOB_TERMINATED, cid, 3)(ev) and count(T.JOB_HELD, cid)(ev),
              what="three ends and a hold")
    assert log.types(cid, 0) == [T.SUBMIT, T.JOB_HELD]
    held = log.of(cid, 0)[-1]
    assert (held["HoldReason"], held["HoldReasonCode"], held["HoldReasonSubCode"]) == ("the disk is gone", 26, 4)
    assert log.types(cid, 1) == [T.SUBMIT, T.EXECUTE, T.JOB_EVICTED, T.EXECUTE, T.JOB_TERMINATED]
    evicted = log.of(cid, 1)
    evicted = [e for e in evicted if e.type == T.JOB_EVICTED][0]
    assert evicted["Reason"] == "Claim preempted" and evicted["ReasonCode"] == 1009
    assert log.of(cid, 2)[-1]["ReturnValue"] == 9 and log.of(cid, 3)[-1]["ReturnValue"] == 0
    assert (jobdir / "o2.txt").read_text() == "2\n", "the outputs of an exit fault still come back"
    h = {a["ProcId"]: a for a in schedd.history(f"ClusterId == {cid}", ["ProcId", "NumJobStarts", "ExitCode"])}
    assert h[1]["NumJobStarts"] == 2 and h[2]["ExitCode"] == 9
    # the held proc runs after a release (the fault was used once)
    schedd.act(JobAction.Release, f"{cid}.0")
    log.until(count(T.JOB_TERMINATED, cid, 4), what="the released proc's run")
    with pytest.raises(ValueError):
        schedd.inject_fault("explode", proc=0)


# -- the follower sees events promptly ---------------------------------------------------------------

def test_a_blocked_follower_wakes_on_each_event(schedd, jobdir):
    (jobdir / "events.log").touch()
    jel = htcondor2.JobEventLog(str(jobdir / "events.log"))
    seen: list[tuple[int, float]] = []
    done = threading.Event()

    def follow():
        # one long wait: it must wake on the daemon's writes, not at its end
        for e in jel.events(stop_after=60):
            seen.append((int(e.type), time.monotonic()))
            if e.type == T.JOB_TERMINATED:
                break
        done.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    t0 = time.monotonic()
    schedd.submit(htcondor2.Submit(sh("exit 0")))
    assert done.wait(30), f"the follower did not wake in time; saw {seen}"
    assert time.monotonic() - t0 < 30
    assert [s for s, _ in seen if s != int(T.FILE_TRANSFER)] == [0, 1, 5]
    t.join(5)


# -- the daemon: found through root, outlives its submitter, stops clean ------------------------------

SUBMITTER = textwrap.dedent("""
    import os, sys, time, htcondor2
    sys.path.insert(0, {root!r})
    from pymw_magic.testing.condor import StandInSchedd
    os.chdir({jobdir!r})
    s = StandInSchedd({sroot!r})
    r = s.submit(htcondor2.Submit({desc!r}), count={n})
    print(r.cluster(), flush=True)
    time.sleep(600)
""")


def test_jobs_outlive_a_submitter_killed_with_sigkill(schedd, jobdir):
    code = SUBMITTER.format(root=ROOT, jobdir=str(jobdir), sroot=str(schedd.root), n=3,
                            desc=sh("sleep 1; echo done $(ProcId) > d$(ProcId).txt",
                                    transfer_output_files="d$(ProcId).txt"))
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        cid = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, cid, 3), what="the orphaned cluster finished")
    assert all((jobdir / f"d{p}.txt").read_text() == f"done {p}\n" for p in range(3))
    # this process finds the same daemon through root, and so does a pickled copy
    clone = pickle.loads(pickle.dumps(schedd))
    assert isinstance(clone, StandInSchedd) and clone.root == schedd.root and clone == schedd
    assert schedd.__reduce__() == (StandInSchedd, (str(schedd.root),))
    assert clone.daemon_pid() == schedd.daemon_pid() is not None
    assert len(clone.history(f"ClusterId == {cid}")) == 3


def test_two_processes_using_it_first_at_once_start_one_daemon(tmp_path):
    root = tmp_path / "r"
    jobdir = tmp_path / "j"
    jobdir.mkdir()
    code = textwrap.dedent(f"""
        import os, sys, htcondor2
        sys.path.insert(0, {ROOT!r})
        from pymw_magic.testing.condor import StandInSchedd
        os.chdir({str(jobdir)!r})
        s = StandInSchedd({str(root)!r})
        d = htcondor2.Submit({{"executable": "/bin/true", "log": "events.log"}})
        r = s.submit(d, count=2)
        print(r.cluster(), s.daemon_pid(), flush=True)
    """)
    s = StandInSchedd(root)
    try:
        for trial in range(3):
            procs = [subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
            outs = [p.communicate(timeout=120)[0].split() for p in procs]
            assert all(p.returncode == 0 for p in procs)
            assert len({o[1] for o in outs}) == 1, f"more than one daemon: {outs}"
            assert len({o[0] for o in outs}) == 4, "two submits got the same cluster"
            log = Log(jobdir / "events.log")
            log.until(count(T.JOB_TERMINATED, None, 8 * (trial + 1)), what="every proc's end")
            s.stop()
            assert not job_processes(root)
    finally:
        s.stop()


def test_stop_kills_procs_and_the_queue_survives_a_restart(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 2; echo ok > ok$(ProcId).txt",
                                          transfer_output_files="ok$(ProcId).txt")), count=3)
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid, 2), what="two running")
    daemon = schedd.daemon_pid()
    pids = list(schedd.running().values())
    schedd.stop()
    assert not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE
    assert not job_processes(schedd.root), "stop() left procs"
    assert not [p for p in pids if psutil.pid_exists(p)]
    log.until(count(T.JOB_EVICTED, cid, 2), what="the evictions of the stop")
    # a new daemon (started by this query) runs the evicted and idle procs again
    assert len(schedd.query(f"ClusterId == {cid}")) == 3
    log.until(count(T.JOB_TERMINATED, cid, 3), what="the cluster finished after the restart")
    assert schedd.daemon_pid() != daemon
    h = {a["ProcId"]: a["NumJobStarts"] for a in schedd.history(f"ClusterId == {cid}", ["ProcId", "NumJobStarts"])}
    assert sorted(h.values()) == [1, 2, 2]
    # ids keep growing across restarts
    assert schedd.submit(htcondor2.Submit(sh("true"))).cluster() == cid + 1


def test_kill_9_of_the_daemon_mid_job(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 3; echo ok > ok.txt", transfer_output_files="ok.txt")))
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid), what="running")
    daemon = schedd.daemon_pid()
    (pid,) = schedd.running().values()
    os.kill(daemon, signal.SIGKILL)
    # the job dies with its daemon, as a job dies with its starter
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               timeout=10, what="the proc killed with its daemon")
    # the next call starts a daemon that requeues the lost run and runs it again
    (ad,) = schedd.query(f"ClusterId == {cid}", ["JobStatus"])
    log.until(count(T.JOB_TERMINATED, cid), what="the re-run")
    assert log.types(cid, 0) == [T.SUBMIT, T.EXECUTE, T.JOB_EVICTED, T.EXECUTE, T.JOB_TERMINATED]
    assert (jobdir / "ok.txt").read_text() == "ok\n"
    (h,) = schedd.history(f"ClusterId == {cid}", ["NumJobStarts", "ExitCode"])
    assert (h["NumJobStarts"], h["ExitCode"]) == (2, 0)


def test_idle_timeout_ends_the_daemon(tmp_path, jobdir):
    s = StandInSchedd(tmp_path / "idle", idle_timeout=1.0)
    try:
        r = s.submit(htcondor2.Submit(sh("sleep 1.5")))
        pid = s.daemon_pid()
        log = Log(jobdir / "events.log")
        log.until(count(T.JOB_TERMINATED, r.cluster()), what="the job's end")
        # not while it had work (the job ran longer than the timeout)
        wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=20, what="the idle daemon's exit")
        assert not (s.root / "daemon.json").exists()
    finally:
        s.stop()


def test_idle_daemon_uses_no_cpu(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("true")))
    Log(jobdir / "events.log").until(count(T.JOB_TERMINATED, r.cluster()), what="the run")
    p = psutil.Process(schedd.daemon_pid())
    before = sum(p.cpu_times()[:2])
    time.sleep(2)  # measuring idleness needs a span of time; no condition to wait for
    assert sum(p.cpu_times()[:2]) - before < 0.05


# -- spool and retrieve ---------------------------------------------------------------------------------

def test_spool_then_retrieve(schedd, jobdir):
    (jobdir / "in.txt").write_text("spooled input\n")
    d = htcondor2.Submit(sh("cat in.txt > out.txt", transfer_input_files="in.txt",
                            transfer_output_files="out.txt"))
    r = schedd.submit(d, spool=True)
    cid = r.cluster()
    (ad,) = schedd.query(f"ClusterId == {cid}", ["JobStatus", "HoldReasonCode"])
    assert (ad["JobStatus"], ad["HoldReasonCode"]) == (5, 16)
    with pytest.raises(ValueError):
        schedd.spool(schedd.submit(htcondor2.Submit(sh("true", log="other.log"))))
    schedd.spool(r)
    (jobdir / "in.txt").write_text("changed after spooling\n")
    # as a real schedd: the proc's working directory and user log move into
    # its spool (the submitter's kept as SUBMIT_*); the submitter's log stays empty
    (ad,) = schedd.query(f"ClusterId == {cid}", ["Iwd", "UserLog", "SUBMIT_Iwd", "SUBMIT_UserLog"])
    assert ad["UserLog"] == "events.log" and ad["SUBMIT_UserLog"] == str(jobdir / "events.log")
    assert ad["SUBMIT_Iwd"] == str(jobdir) and ad["Iwd"] != str(jobdir)
    log = Log(Path(ad["Iwd"]) / "events.log")
    log.until(count(T.JOB_TERMINATED, cid), what="the spooled job's end")
    assert not (jobdir / "out.txt").exists(), "outputs stay in the spool until retrieved"
    assert not (jobdir / "events.log").exists(), "the log stays in the spool until retrieved"
    (ad,) = schedd.query(f"ClusterId == {cid}", ["JobStatus"])
    assert ad["JobStatus"] == 4
    schedd.retrieve(f"ClusterId == {cid}")
    assert (jobdir / "out.txt").read_text() == "spooled input\n"
    back = Log(jobdir / "events.log")  # the proc's log, copied back
    back.until(count(T.JOB_TERMINATED, cid), what="the retrieved log's end")
    assert schedd.query(f"ClusterId == {cid}") == []


def test_retrieve_copies_each_procs_log_over_the_submitters(schedd, jobdir):
    """Two spooled procs sharing one log: retrieve copies each proc's log
    back in turn (a real schedd's retrieve does not append them)."""
    r = schedd.submit(htcondor2.Submit(sh("echo $1 > out.$(ProcId)", arguments="\"-c 'echo $(ProcId) > out.$(ProcId)'\"",
                                          transfer_output_files="out.$(ProcId)")), count=2, spool=True)
    cid = r.cluster()
    schedd.spool(r)
    for p in (0, 1):
        (ad,) = schedd.query(f"ClusterId == {cid} && ProcId == {p}", ["Iwd"])
        Log(Path(ad["Iwd"]) / "events.log").until(count(T.JOB_TERMINATED, cid), what=f"proc {p}'s end")
    schedd.retrieve(f"ClusterId == {cid}")
    assert (jobdir / "out.0").read_text() == "0\n" and (jobdir / "out.1").read_text() == "1\n"
    back = Log(jobdir / "events.log")
    back.until(count(T.JOB_TERMINATED, cid), what="the retrieved log's end")
    assert {e.proc for e in back.events} == {1}, "only the last retrieved proc's log is there"


def test_a_macro_in_a_custom_attribute_is_expanded_per_proc(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("true", **{"My.Chunk": "$(chunk)", "+Tag": '"t$(chunk)"'})),
                      itemdata=iter([{"chunk": "7"}, {"chunk": "9"}]))
    ads = sorted(schedd.query(f"ClusterId == {r.cluster()}", ["ProcId", "Chunk", "Tag"]), key=lambda a: a["ProcId"])
    assert [(a["Chunk"], a["Tag"]) for a in ads] == [(7, "t7"), (9, "t9")]


# -- late materialization --------------------------------------------------------------------------------

def test_max_idle_materializes_procs_as_others_leave(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 0.2", max_idle="2")), count=8)
    cid = r.cluster()
    assert r.num_procs() == 8
    seen_max_idle = 0
    log = Log(jobdir / "events.log")

    def check(events):
        nonlocal seen_max_idle
        ads = schedd.query(f"ClusterId == {cid}", ["JobStatus"])
        seen_max_idle = max(seen_max_idle, sum(1 for a in ads if a["JobStatus"] == 1))
        return count(T.JOB_TERMINATED, cid, 8)(events)
    log.until(check, what="all eight procs")
    assert seen_max_idle <= 2


# -- hostile: scale, size, odd paths -------------------------------------------------------------------

def test_200_proc_cluster(tmp_path, jobdir):
    s = StandInSchedd(tmp_path / "wide", slots=8)
    try:
        r = s.submit(htcondor2.Submit(sh("echo $(i) > r$(i).txt", transfer_output_files="r$(i).txt")),
                     itemdata=iter([{"i": str(i)} for i in range(200)]))
        log = Log(jobdir / "events.log")
        log.until(count(T.JOB_TERMINATED, r.cluster(), 200), timeout=240, what="200 ends")
        assert all((jobdir / f"r{i}.txt").read_text() == f"{i}\n" for i in range(200))
        assert {e.proc for e in log.events if e.type == T.JOB_TERMINATED} == set(range(200))
        assert all(e["ReturnValue"] == 0 for e in log.events if e.type == T.JOB_TERMINATED)
    finally:
        s.stop()
    assert not job_processes(s.root)


def test_a_proc_writing_a_huge_output(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("head -c 60000000 /dev/zero; head -c 30000000 /dev/zero > big.bin",
                                          output="stdout.bin", transfer_output_files="big.bin")))
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, r.cluster()), timeout=120, what="the end")
    assert (jobdir / "stdout.bin").stat().st_size == 60_000_000
    assert (jobdir / "big.bin").stat().st_size == 30_000_000
    assert log.events[-1]["SentBytes"] >= 90_000_000


def test_paths_with_spaces_everywhere(tmp_path):
    root = tmp_path / "a root with spaces" / ("deep " * 12).strip()
    jd = tmp_path / "my jobs" / "job one"
    jd.mkdir(parents=True)
    (jd / "in put.txt").write_text("spaced\n")
    s = StandInSchedd(root)
    try:
        assert len(str(root / "schedd.sock")) > 100  # the socket lives elsewhere, found through root
        r = s.submit(htcondor2.Submit(sh("cat \"in put.txt\" > \"out put.txt\"",
                                         transfer_input_files="in put.txt", transfer_output_files="out put.txt",
                                         initialdir=str(jd), log=str(jd / "event log.txt"))))
        log = Log(jd / "event log.txt")
        log.until(count(T.JOB_TERMINATED, r.cluster()), what="the end")
        assert (jd / "out put.txt").read_text() == "spaced\n"
    finally:
        s.stop()
    assert not job_processes(root)


def test_ten_thousand_procs_queue_fast(tmp_path, jobdir):
    s = StandInSchedd(tmp_path / "big", slots=2)
    try:
        s.daemon_pid()
        s.query("false")  # the daemon is up: time the submit alone
        t0 = time.perf_counter()
        r = s.submit(htcondor2.Submit(sh("exit 0", submit_event_notes="$(chunk)")),
                     itemdata=iter([{"chunk": str(i)} for i in range(10_000)]))
        elapsed = time.perf_counter() - t0
        assert r.num_procs() == 10_000
        assert elapsed < 10, f"queuing 10,000 procs took {elapsed:.1f} s"
        log = Log(jobdir / "events.log")
        log.until(count(T.SUBMIT, r.cluster(), 10_000), timeout=60, what="10,000 submit events")
        notes = [e["LogNotes"] for e in log.events if e.type == T.SUBMIT]
        assert notes[:3] == ["0", "1", "2"] and notes[-1] == "9999"
        assert len(s.query(f"ClusterId == {r.cluster()} && JobStatus == 2")) <= 2
        out = s.act(JobAction.Remove, r.cluster())
        ran = s.history(f"ClusterId == {r.cluster()} && JobStatus == 4", ["ProcId"])
        assert out["TotalSuccess"] + len(ran) == 10_000 and out["TotalNotFound"] == 0
        log.until(lambda lg: lg.n(T.JOB_ABORTED, r.cluster()) + lg.n(T.JOB_TERMINATED, r.cluster()) >= 10_000,
                  timeout=120, what="the removal of all")
    finally:
        s.stop()


def test_hold_then_remove_before_the_proc_dies_removes_it(schedd, jobdir):
    # the job ignores SIGTERM, so it is still alive when the removal comes
    r = schedd.submit(htcondor2.Submit(sh("trap \"\" TERM; sleep 60 & wait; sleep 60")))
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid), what="running")
    pid = schedd.running()[f"{cid}.0"]
    # its sleep exists once the trap is set
    wait_until(lambda: psutil.Process(pid).children(), timeout=30, what="the job's trap set")
    assert schedd.act(JobAction.Hold, cid)["TotalSuccess"] == 1
    assert schedd.act(JobAction.Remove, cid)["TotalSuccess"] == 1
    log.until(count(T.JOB_ABORTED, cid), timeout=30, what="the abort")
    assert log.types(cid, 0) == [T.SUBMIT, T.EXECUTE, T.JOB_EVICTED, T.JOB_ABORTED]
    assert schedd.query(f"ClusterId == {cid}") == []
    assert schedd.history(f"ClusterId == {cid}", ["JobStatus"])[0]["JobStatus"] == 3


def test_many_threads_submit_and_query_at_once(schedd, jobdir, fast_switching):
    errors: list[BaseException] = []
    clusters: list[int] = []
    lock = threading.Lock()

    def work(i):
        try:
            for j in range(4):
                r = schedd.submit(htcondor2.Submit(sh("exit 0", submit_event_notes=f"t{i}-{j}")))
                with lock:
                    clusters.append(r.cluster())
                schedd.query(f"ClusterId == {r.cluster()}", ["JobStatus"])
                schedd.history("true", ["ClusterId"], match=3)
        except BaseException as e:  # collected and re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(set(clusters)) == 32
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, None, 32), timeout=120, what="32 ends")
    notes = {e["LogNotes"] for e in log.events if e.type == T.SUBMIT}
    assert notes == {f"t{i}-{j}" for i in range(8) for j in range(4)}


def test_removing_a_late_materializing_cluster_ends_its_factory(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 60", max_idle="1")), count=6)
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid, 2), what="two running")
    queued = schedd.query(f"ClusterId == {cid}", ["ProcId"])
    assert len(queued) == 3, "two running and one idle: max_idle 1"
    out = schedd.act(JobAction.Remove, cid)
    assert out["TotalSuccess"] == 3
    log.until(count(T.JOB_ABORTED, cid, 3), what="three aborts")
    # nothing more materializes: the queue stays empty, and a new daemon agrees
    assert schedd.query(f"ClusterId == {cid}") == []
    assert log.n(T.SUBMIT, cid) == 3
    schedd.stop()
    assert schedd.query(f"ClusterId == {cid}") == []
    assert len(schedd.history(f"ClusterId == {cid}")) == 3
    again = [e for e in htcondor2.JobEventLog(str(jobdir / "events.log")).events(0)
             if e.cluster == cid and e.type == T.SUBMIT]
    assert len(again) == 3


def test_requirements_no_slot_matches_stay_idle_until_edited(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("exit 0", requirements='OpSys == "WINDOWS"')))
    cid = r.cluster()
    r2 = schedd.submit(htcondor2.Submit(sh("exit 0")))
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, r2.cluster()), what="the matching job's end")
    (ad,) = schedd.query(f"ClusterId == {cid}", ["JobStatus", "Requirements"])
    assert ad["JobStatus"] == 1 and log.types(cid, 0) == [T.SUBMIT]
    assert schedd.edit(f"{cid}.0", "Requirements", 'OpSys == "LINUX"') == 1
    log.until(count(T.JOB_TERMINATED, cid), what="the edited job's end")


def test_periodic_remove_fires_on_a_running_job(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 60", periodic_remove="JobStatus == 2")))
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_ABORTED, cid), timeout=30, what="the policy removal")
    assert log.types(cid, 0) == [T.SUBMIT, T.EXECUTE, T.JOB_EVICTED, T.JOB_ABORTED]
    assert log.of(cid, 0)[-1]["Reason"] == "The job attribute PeriodicRemove expression 'JobStatus == 2' " \
                                           "evaluated to TRUE"


def test_history_since_match_and_released_attributes(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("exit $(ProcId)")), count=4)
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, cid, 4), what="four ends")
    order = [a["ProcId"] for a in schedd.history(f"ClusterId == {cid}", ["ProcId"])]
    assert sorted(order) == [0, 1, 2, 3]
    newest_first = order
    since = f"{cid}.{newest_first[2]}"
    assert [a["ProcId"] for a in schedd.history(None, ["ProcId"], since=since)] == newest_first[:2]
    assert len(schedd.history(f"ClusterId == {cid}", ["ProcId"], match=3)) == 3
    assert schedd.history(f"ClusterId == {cid} && ExitCode == 2", ["ProcId"])[0]["ProcId"] == 2
    # a released job's ad no longer carries the hold reason; RemoteHost goes when it stops
    r2 = schedd.submit(htcondor2.Submit(sh("sleep 60", hold="true")))
    log.until(count(T.JOB_HELD, r2.cluster()), what="held at submit")
    (held,) = schedd.query(f"ClusterId == {r2.cluster()}", ["HoldReasonCode", "HoldReason"])
    assert held["HoldReasonCode"] == 15
    schedd.act(JobAction.Release, r2.cluster())
    log.until(count(T.EXECUTE, r2.cluster()), what="running after release")
    (ad,) = schedd.query(f"ClusterId == {r2.cluster()}")
    assert "HoldReason" not in ad and "HoldReasonCode" not in ad and ad["RemoteHost"].startswith("slot1_")
    schedd.act(JobAction.Vacate, r2.cluster())
    log.until(count(T.EXECUTE, r2.cluster(), 2), what="running again after a vacate")
    schedd.act(JobAction.Remove, r2.cluster())
    log.until(count(T.JOB_ABORTED, r2.cluster()), what="removed")
    (h,) = schedd.history(f"ClusterId == {r2.cluster()}")
    assert "RemoteHost" not in h and h["LastRemoteHost"].startswith("slot1_") and h["NumJobStarts"] == 2


def test_vacated_run_keeps_its_files_with_on_exit_or_evict(schedd, jobdir):
    script = ("if [ -f progress ]; then cat progress > result.txt; echo resumed >> result.txt; "
              "else echo step1 > progress; sleep 60; fi")
    r = schedd.submit(htcondor2.Submit(sh(script)))
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid), what="running")
    pid = schedd.running()[f"{cid}.0"]
    sandbox = Path(psutil.Process(pid).cwd())
    wait_until(lambda: (sandbox / "progress").exists(), timeout=30, what="the first run's progress file")
    assert schedd.act(JobAction.Vacate, f"{cid}.0")["TotalSuccess"] == 1
    log.until(count(T.JOB_TERMINATED, cid), what="the second run's end")
    assert log.types(cid, 0) == [T.SUBMIT, T.EXECUTE, T.JOB_EVICTED, T.EXECUTE, T.JOB_TERMINATED]
    assert (jobdir / "result.txt").read_text() == "step1\nresumed\n"
    assert not (jobdir / "progress").exists(), "an input brought back unchanged is not an output"
    # the job leaves the queue just after its 005 event; its eviction spool goes with it
    wait_until(lambda: not list((schedd.root / "spool").iterdir()), timeout=30,
               what="the spool emptied of a job that left the queue")


def test_owner_only_files_and_a_fault_for_a_known_cluster(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("exit 0", hold="true")), count=2)
    cid = r.cluster()
    import stat as st
    assert st.S_IMODE(os.stat(schedd.root).st_mode) == 0o700
    info = json.loads((schedd.root / "daemon.json").read_text())
    assert st.S_IMODE(os.stat(info["socket"]).st_mode) == 0o600
    assert st.S_IMODE(os.stat(schedd.root / "job_queue.log").st_mode) == 0o600
    assert int((schedd.root / "daemon.pid").read_text()) == schedd.daemon_pid() == info["pid"]
    schedd.inject_fault("exit", cluster=cid, proc=1, exit_code=5)
    schedd.act(JobAction.Release, cid)
    log = Log(jobdir / "events.log")
    log.until(count(T.JOB_TERMINATED, cid, 2), what="both ends")
    assert log.of(cid, 1)[-1]["ReturnValue"] == 5 and log.of(cid, 0)[-1]["ReturnValue"] == 0


def test_suspend_continue_and_an_exprtree_job_spec(schedd, jobdir):
    r = schedd.submit(htcondor2.Submit(sh("sleep 60")))
    cid = r.cluster()
    log = Log(jobdir / "events.log")
    log.until(count(T.EXECUTE, cid), what="running")
    pid = schedd.running()[f"{cid}.0"]
    spec = classad2.ExprTree(f"ClusterId == {cid} && ProcId == 0")
    assert schedd.act(JobAction.Suspend, spec)["TotalSuccess"] == 1
    def states():
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
        return {q.status() for q in procs}
    # every process of the job stopped (a shell waiting in vfork for a child that was
    # stopped before its exec sits in disk-sleep, and is stopped as well as can be)
    wait_until(lambda: psutil.STATUS_STOPPED in states() <= {psutil.STATUS_STOPPED, psutil.STATUS_DISK_SLEEP},
               timeout=30, what="stopped")
    assert schedd.query(spec, ["JobStatus"])[0]["JobStatus"] == 7
    assert schedd.act(JobAction.Continue, spec)["TotalSuccess"] == 1
    wait_until(lambda: psutil.STATUS_STOPPED not in states(), timeout=30, what="continued")
    assert schedd.query(spec, ["JobStatus"])[0]["JobStatus"] == 2
    assert schedd.act(JobAction.RemoveX, spec)["TotalSuccess"] == 1
    log.until(count(T.JOB_ABORTED, cid), what="removed")


def test_the_journal_replays_to_the_same_queue(tmp_path):
    from pymw_magic.testing._condor_queue import Expr, Queue
    q = Queue(tmp_path)
    q.load()
    c = q.new_cluster({"submit": {"executable": "/bin/true"}, "keys": [], "rows": [], "count": 3, "nprocs": 3,
                       "cwd": str(tmp_path), "spool": False, "base": {"ClusterId": 1, "Owner": "me"}})
    batch: list = []
    for p in range(3):
        q.materialize(c, p, {"ProcId": p, "JobStatus": 1}, batch)
    q.log_materialized(c, batch)
    q.set((c.id, 1), JobStatus=5, HoldReason="x", Requirements=Expr("OpSys == \"LINUX\""))
    q.set((c.id, 1), HoldReason=None)
    q.leave((c.id, 0))
    q.flush()
    again = Queue(tmp_path)
    again.load()   # replays, then compacts
    third = Queue(tmp_path)
    third.load()   # reads the compacted journal
    for other in (again, third):
        assert set(other.jobs) == {(c.id, 1), (c.id, 2)}
        assert other.ad((c.id, 1))["JobStatus"] == 5 and "HoldReason" not in other.ad((c.id, 1))
        assert isinstance(other.ad((c.id, 1))["Requirements"], Expr)
        assert other.next_cluster == 2 and other.clusters[c.id].in_queue == 2
        assert [job["ProcId"] for job, _ in other.history()] == [0]


def test_requests_racing_the_idle_exit_are_never_lost(tmp_path, jobdir):
    import random
    s = StandInSchedd(tmp_path / "racy", idle_timeout=0.2)
    errors: list[BaseException] = []
    pids: set[int] = set()
    submitted: list[int] = []
    lock = threading.Lock()

    def work(seed):
        rnd = random.Random(seed)
        try:
            for i in range(25):
                # gaps around the idle timeout, so that requests meet a daemon on its way out
                time.sleep(rnd.uniform(0.0, 0.4))
                if i % 5 == 0:
                    r = s.submit(htcondor2.Submit(sh("exit 0")))
                    with lock:
                        submitted.append(r.cluster())
                else:
                    s.query("false")
                pid = s.daemon_pid()
                if pid:
                    with lock:
                        pids.add(pid)
        except BaseException as e:  # collected and re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        assert len(set(submitted)) == 20
        log = Log(jobdir / "events.log")
        log.until(count(T.JOB_TERMINATED, None, 20), timeout=120, what="every submitted job's end")
        assert len(pids) > 1, "the daemon never exited idle: the race was not exercised"
    finally:
        s.stop()
    wait_until(lambda: not job_processes(s.root), timeout=15, what="no process left")


def test_idle_exit_serves_what_waits_in_the_backlog(tmp_path):
    from pymw_magic.testing import _condor_daemon as daemon_mod
    root = tmp_path / "backlog"
    root.mkdir(mode=0o700)
    d = daemon_mod.Daemon(root, slots=1, idle_timeout=0.01)
    d.q.load()
    d.listen()
    path = d.sock_path
    try:
        def ask(msg):
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(30)
            c.connect(path)  # accepted by the kernel's backlog, not yet by the daemon
            c.sendall(json.dumps(msg).encode() + b"\n")
            return c

        waiting = ask({"op": "ping"})
        with pytest.raises(daemon_mod.StopDaemon):
            d._idle_exit()
        assert json.loads(waiting.makefile().readline())["ok"]["pid"] == os.getpid()
        assert not os.path.exists(path), "the address must go before the backlog is drained"
        waiting.close()

        # a submit waiting there brings work: the daemon stays and listens again
        d.listen()
        desc = sh("exit 0", log=str(tmp_path / "ev.log"))
        waiting = ask({"op": "submit", "submit": desc, "keys": [], "rows": [[]], "count": 1, "spool": False,
                       "cwd": str(tmp_path), "env": {}})
        d._idle_exit()
        assert json.loads(waiting.makefile().readline())["ok"]["num_procs"] == 1
        assert os.path.exists(path) and json.loads((root / "daemon.json").read_text())["pid"] == os.getpid()
        waiting.close()
    finally:
        d.shutdown()
