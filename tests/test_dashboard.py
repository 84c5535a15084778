"""The dashboard and live sweeps: the backend form generated from option
declarations, Apply through the magics' Session (in a real kernel) and
without it, the paged task table over 100,000 tasks, the job rows and
timeline, and a sweep cancelling its stale job's pending tasks."""

from __future__ import annotations

import functools
import time

import ipywidgets
import pytest
from ipywidgets.widgets.widget import _instances  # every live widget model

from pymw_magic.backends import Option, backend_names, master_options
from pymw_magic.task import CANCELLED, DONE, FAILED, PENDING, Task
from pymw_magic.widgets import dashboard as dash
from pymw_magic.widgets.dashboard import BackendForm, Dashboard, TaskTable
from pymw_magic.widgets.jobview import Ticker
from pymw_magic.widgets.sweep import Sweep
from test_widgets import Notebook, notebook, kernel_env  # noqa: F401 - fixtures


@pytest.fixture
def fallback():
    """The module-level default master (no %load_ext), shut down afterwards."""
    yield
    master = dash.fallback_master()
    dash.set_fallback_master(None)
    if master is not None:
        master.shutdown(wait=True, cancel_futures=True)


def _eventually(predicate, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_form_fields_come_from_the_option_declarations():
    form = BackendForm(on_apply=lambda b, o: pytest.fail("must not apply"))
    assert list(form.backend.options) == backend_names()
    from pymw_magic.backends import get_backend
    declared = {**master_options(), **get_backend(form.backend.value).options}
    assert list(form.fields) == list(declared)
    assert isinstance(form.fields["policy"], ipywidgets.Dropdown)
    assert [label for label, _ in form.fields["policy"].options] == [str(c) for c in declared["policy"].suggestions]
    assert all(form.fields[name].description == name for name in declared)

    form.fields["workers"].value = "two"
    form.fields["retries"].value = "-1"
    assert form.apply() is None
    assert "is not a whole number &gt;= 1" in form.errors["workers"].value
    assert "is not a whole number &gt;= 0" in form.errors["retries"].value
    assert form.errors["timeout"].value == ""
    assert "2 invalid value(s)" in form.status.value


def test_the_form_shows_the_converters_own_reason_as_the_magics_do():
    form = BackendForm(on_apply=lambda b, o: pytest.fail("must not apply"))
    form.backend.value = "simulator"
    form.fields["availability"].value = "onoff:0,0"
    form.fields["speeds"].value = "lognormal:1,-1"
    assert form.apply() is None
    assert "up time must be &gt; 0" in form.errors["availability"].value
    assert "onoff:UP,DOWN" in form.errors["availability"].value  # and the valid forms
    assert "SIGMA &gt;= 0" in form.errors["speeds"].value


def test_a_new_backend_gets_its_form_for_free(monkeypatch):
    from pymw_magic.backends import local

    class Extra(local.LocalBackend):
        name = "extra"
        options = {"colour": Option("colour", str, "red", "a colour", choices=("red", "blue")),
                   "verbose": Option("verbose", bool, False, "talk more"),
                   "depth": Option("depth", int, 3, "how deep", check=lambda n: n > 0,
                                   requirement="a whole number > 0")}

    monkeypatch.setattr(local, "Extra", Extra, raising=False)
    from pymw_magic import backends
    monkeypatch.setitem(backends._REGISTRY, "extra", "pymw_magic.backends.local:Extra")
    applied = []
    form = BackendForm(on_apply=lambda b, o: applied.append((b, o)) or _FakeMaster(b, o))
    form.backend.value = "extra"
    assert isinstance(form.fields["colour"], ipywidgets.Dropdown)
    assert isinstance(form.fields["verbose"], ipywidgets.Checkbox)
    form.fields["depth"].value = "0"
    assert form.apply() is None and "is not a whole number &gt; 0" in form.errors["depth"].value
    form.fields["depth"].value = "5"
    form.fields["colour"].value = "blue"
    form.fields["verbose"].value = True
    form.fields["workers"].value = "2"
    assert form.apply() is not None
    assert applied == [("extra", {"workers": 2, "colour": "blue", "verbose": True, "depth": 5})]
    assert form.errors["depth"].value == "" and "with 2 worker(s)" in form.status.value


class _FakeMaster:
    def __init__(self, backend, options):
        self.backend_name, self.options, self.workers = backend, dict(options), options.get("workers")


def test_apply_without_the_extension_replaces_the_module_default(fallback):
    d = Dashboard(ticker=Ticker(3600))  # no background ticks: the test drives it
    try:
        d.form.fields["workers"].value = "1"
        first = d.form.apply()
        assert first is dash.current_master(create=False) and first.workers == 1
        d.form.fields["workers"].value = "2"
        second = d.form.apply()
        assert second is dash.current_master(create=False) and second.workers == 2
        assert first._shutdown  # replaced masters are shut down
        job = second.map_async(abs, range(-30, 0), name="abs")
        job.wait()
        d.tick()
        rows = d.jobs_box.children
        assert len(rows) == 1 and "job &#x27;abs&#x27; finished: done 30" in rows[0].bar.value
        assert d.job_select.value is job
        assert "tasks 1\u201320 of 30" in d.task_table.page_label.value
        assert d.timeline.value == ""  # drawn only while its tab is shown
        d.details.selected_index = 1
        assert 'class="pymw-timeline"' in d.timeline.value and "job abs" in d.timeline.value
    finally:
        d.close()


def _fake_job(n: int):
    """A job-like object with ``n`` task records (the table reads only ``tasks``)."""
    class FakeJob:
        tasks = [Task(i, None, i, None, (i,), {}, 0.0) for i in range(n)]
    for t in FakeJob.tasks[::1000]:
        t.state, t.error, t.worker = FAILED, ValueError(f"bad {t.index}"), "w1"
    for t in FakeJob.tasks[1::2]:
        t.state, t.started, t.finished, t.worker = DONE, 1.0, 1.5, "w0"
    return FakeJob()


def test_task_table_pages_100000_tasks_without_100000_widgets():
    before = len(_instances)
    table = TaskTable(_fake_job(100_000), page_size=25)
    assert len(_instances) - before < 20  # one table, not a widget per task
    assert table.page_label.value == "tasks 1\u201325 of 100,000"
    assert table.table.value.count("<tr>") == 26 and table.prev_button.disabled
    table.next_button.click()
    assert table.page_label.value == "tasks 26\u201350 of 100,000" and not table.prev_button.disabled
    table.page = 10**9  # past the end: clamped to the last page
    table.refresh()
    assert table.page_label.value == "tasks 99,976\u2013100,000 of 100,000" and table.next_button.disabled
    table.state_filter.value = "failed"
    assert table.page == 0 and table.page_label.value == "tasks 1\u201325 of 100"
    assert "ValueError: bad 0" in table.table.value and "<td style='padding:0 8px'>w1</td>" in table.table.value
    table.state_filter.value = "done"
    assert table.page_label.value == "tasks 1\u201325 of 50,000"
    assert "0.5 s" in table.table.value
    table.state_filter.value = "retrying"
    assert table.page_label.value == "no tasks" and table.next_button.disabled


def _model(seed: int, rate: float = 1.0) -> float:
    import random
    time.sleep(0.02)
    return random.Random(seed).expovariate(rate)


def test_a_newer_sweep_setting_cancels_the_stale_jobs_pending_tasks(master):
    sw = Sweep(_model, range(400), master=master, chunksize=1, ticker=Ticker(3600),
               rate=(0.5, 2.0, 0.5))
    try:
        assert list(sw.controls) == ["rate"] and sw.controls["rate"].value == 1.0
        stale = sw.job
        _eventually(lambda: stale.counts()["done"] >= 4, "the first job got going")
        sw.controls["rate"].value = 2.0       # as a user's slider change does
        fresh = sw.job
        assert fresh is not stale and [p for p, _ in sw.runs] == [{"rate": 1.0}, {"rate": 2.0}]
        assert fresh.wait(120) and stale.wait(120)
        states = [t.state for t in stale.tasks]
        # The stale job's pending tasks were cancelled, none left pending...
        assert states.count(CANCELLED) > 0 and PENDING not in states
        # ...those already running finished, and the stale input was not read on.
        assert set(states) <= {DONE, CANCELLED} and stale.counts()["cancelled"] + stale.counts()["done"] == len(states)
        assert stale.counts()["done"] < 400
        assert fresh.counts()["done"] == 400 and {t.state for t in fresh.tasks} == {DONE}
        sw.tick()
        assert "rate=2.0: 400/400 results" in sw.summary.value
        assert sw.results() == [_model(s, 2.0) for s in range(400)]
    finally:
        sw.close()


def test_sweep_controls_from_abbreviations_and_widgets(master):
    slider = ipywidgets.IntSlider(value=3, min=1, max=5)
    sw = Sweep(lambda x, n=1, kind="a": f"{kind}{x * n}", range(3), master=master, ticker=Ticker(3600),
               n=slider, kind=["a", "b"])
    try:
        assert sw.controls["n"] is slider and slider.description == "n"
        assert isinstance(sw.controls["kind"], ipywidgets.Dropdown)
        assert sw.job.wait(60) and sw.results() == ["a0", "a3", "a6"]
        sw.controls["kind"].value = "b"
        assert sw.job.wait(60) and sw.results() == ["b0", "b3", "b6"]
    finally:
        sw.close()
    with pytest.raises(ValueError, match="at least one parameter"):
        Sweep(abs, [1], master=master)


def test_dashboard_apply_goes_through_the_kernels_session(notebook):
    shown = notebook.run("%pymw dashboard")
    board = notebook.shown_widget(shown)
    assert "pymw-dashboard" in board["_dom_classes"]
    cell = notebook.run(
        "d = _\n"
        "d.form.fields['workers'].value = 'many'\n"
        "d.form.apply_button.click()\n"
        "d.form.fields['workers'].value = '3'\n"
        "d.form.fields['retries'].value = '2'\n"
        "d.form.apply_button.click()\n"
        "%pymw status")
    printed = notebook.printed(cell)
    assert "pymw default: backend 'local' with 3 worker(s)" in printed
    form = notebook.state(board["children"][1])
    assert "pymw-backend-form" in form["_dom_classes"]
    status = notebook.state(notebook.state(form["children"][2])["children"][1])
    assert "backend local with 3 worker(s)" in status["value"]
    # The bad value was shown beside its field before the good one was applied.
    notebook.run("d.form.fields['timeout'].value = 'soon'\nd.form.apply_button.click()")
    fields = notebook.state(form["children"][1])["children"]
    names = [notebook.state(notebook.state(row)["children"][0])["description"] for row in fields]
    timeout_row = notebook.state(fields[names.index("timeout")])
    assert "is not a number of seconds &gt; 0" in notebook.state(timeout_row["children"][1])["value"]
    # A job run after Apply appears in the dashboard's jobs.
    notebook.run("%%pymw --map x in range(10) --name after\nx")
    listed = notebook.run("d.refresh()\nprint([v.job.name for v in d.jobs_box.children], "
                          "d.job_select.value.name, d.task_table.page_label.value)")
    assert notebook.printed(listed).strip() == "['after'] after tasks 1\u201310 of 10"
    # Jobs the Session does not know of are listed too: those of a master the
    # notebook made itself, and the job grouping submit() calls.
    notebook.run("from pymw_magic import Master\n"
                 "from pymw_magic.widgets.dashboard import current_master\n"
                 "own = Master('local', workers=1)\n"
                 "own_job = own.map_async(abs, range(-5, 0), name='own-master-job')\n"
                 "assert own_job.wait(60)  # (held: a finished job nobody holds is released)\n"
                 "assert current_master().submit(abs, -3).result(60) == 3")
    listed = notebook.run("d.refresh()\nprint(sorted(v.job.name for v in d.jobs_box.children))\n"
                          "own.shutdown()")
    assert notebook.printed(listed).strip() == "['after', 'own-master-job', 'submit:abs']"
    # Apply on a backend that cannot start: the click shows why in the form,
    # and nothing escapes the button's callback as a traceback.
    clicked = notebook.run("import pymw_magic.backends.mpi as mpi_backend\n"
                           "def no_mpiexec():\n"
                           "    raise FileNotFoundError('no mpiexec found beside this Python or on PATH')\n"
                           "mpi_backend.find_mpiexec = no_mpiexec\n"
                           "d.form.backend.value = 'mpi'\n"
                           "d.form.apply_button.click()\n"
                           "print(d.form.status.value)\nprint(d.form.errors['mpiexec'].value)")
    assert [o for o in clicked.outputs if o["output_type"] == "error"] == []
    printed = notebook.printed(clicked)
    assert "Traceback" not in printed and "starting mpi" not in printed
    assert "backend mpi not started: FileNotFoundError: no mpiexec found" in printed.splitlines()[0]
    assert "no mpiexec found" in printed.splitlines()[1]


# --- the timeline: running tasks up to now, tasks stopped by a cancel ---------------------

def _record(i: int, state, worker: str | None, started=None, finished=None, job=None) -> Task:
    t = Task(i, job, i, None, (i,), {}, 0.0)
    t.state, t.worker, t.started, t.finished = state, worker, started, finished
    return t


def test_timeline_from_task_records_follows_the_schedulers_contract():
    from pymw_magic.task import RUNNING, RETRYING
    from pymw_magic.widgets.timeline import Timeline

    tasks = [_record(0, DONE, "w0", 1.0, 2.0),
             _record(1, RUNNING, "w0", 2.0),                  # running: drawn up to now
             _record(2, CANCELLED, "w1", 1.5, 3.0),           # stopped by a cancel while it ran
             _record(3, CANCELLED, "w1"),                     # cancelled before it started
             _record(4, PENDING, "w1"),                       # sent ahead, not started yet
             _record(5, RETRYING, "w1", 0.5),                 # lost; its rerun has not started
             _record(6, FAILED, "w0", 0.2, 0.9)]
    tl = Timeline.from_tasks(tasks, now=4.0)
    assert tl.rows == ["w0", "w1"]
    assert sorted(tl.bars) == sorted([(0, 1.0, 2.0, "done"), (0, 2.0, 4.0, "running"),
                                      (1, 1.5, 3.0, "cancelled"), (0, 0.2, 0.9, "failed")])
    assert (tl.t0, tl.t1) == (0.0, 4.0)
    svg = tl.to_svg()
    for kind in ("done", "running", "cancelled", "failed"):
        assert f'class="{kind}"' in svg


def test_timeline_draws_running_tasks_up_to_now_on_the_tasks_own_clock():
    """A simulated job's tasks are stamped in virtual seconds: "now" is the
    scheduler's clock, not the wall clock (which would squash every bar)."""
    from types import SimpleNamespace

    from pymw_magic.task import RUNNING
    from pymw_magic.widgets.timeline import Timeline

    virtual = SimpleNamespace(master=SimpleNamespace(_scheduler=SimpleNamespace(clock=lambda: 50.0)))
    tasks = [_record(0, DONE, "h0", 10.0, 20.0, job=virtual), _record(1, RUNNING, "h0", 20.0, job=virtual)]
    tl = Timeline.from_tasks(tasks)
    assert (0, 20.0, 50.0, "running") in tl.bars and tl.t1 == 50.0
    real = SimpleNamespace(master=SimpleNamespace(_scheduler=SimpleNamespace(clock=time.time)))
    started = time.time()
    tl = Timeline.from_tasks([_record(0, RUNNING, "w0", started, job=real)])
    assert tl.bars[0][2] >= started


def _nap(x: int) -> int:
    time.sleep(0.05 if x < 2 else 120)
    return x


def test_dashboard_timeline_shows_running_tasks_live_then_the_cancelled_ones(master):
    """Depends on the scheduler stamping ``started`` when a task starts and
    ``finished`` when a cancel stops it."""
    from pymw_magic.task import RUNNING

    # delay=0: a running job is listed at the first tick (the test drives them)
    d = Dashboard(masters=lambda: [master], ticker=Ticker(3600), delay=0)
    job = master.map_async(_nap, range(6), chunksize=1, name="naps")
    try:
        _eventually(lambda: job.counts()["done"] == 2 and job.counts()["running"] == 2,
                    "two tasks done, two running")
        running = [t for t in job.tasks if t.state is RUNNING]
        assert all(t.started is not None and t.finished is None for t in running)
        d.tick()
        d.details.selected_index = 1  # the timeline tab
        svg = d.timeline.value
        assert 'class="done"' in svg and 'class="running"' in svg
        assert svg.split('class="running">')[1].split("</g>")[0].count("<rect") == 2
        # No event comes while the two tasks sleep, yet their bars grow: the
        # timeline of an active job is redrawn when due.
        drawn = svg
        d._timeline_due = 0.0
        _eventually(lambda: d.tick() and d.timeline.value != drawn, "the running bars were redrawn", 20)
        assert 'class="running"' in d.timeline.value
        job.cancel()  # pending tasks dropped, the two running stopped
        assert job.wait(60)
        stopped = [t for t in running if t.state is CANCELLED]
        assert len(stopped) == 2 and all(t.started is not None and t.finished is not None for t in stopped)
        d._timeline_due = 0.0
        d.tick()
        svg = d.timeline.value
        assert 'class="running"' not in svg
        assert svg.split('class="cancelled">')[1].split("</g>")[0].count("<rect") == 2
    finally:
        job.cancel()
        d.close()


# --- the form: a backend that cannot start, bad paths ---------------------------------------

def test_apply_shows_why_a_backend_cannot_start_and_keeps_the_old_master(fallback, monkeypatch):
    from pymw_magic.backends import mpi

    def no_mpiexec() -> str:
        raise FileNotFoundError("no mpiexec found beside this Python or on PATH (a machine without MPI)")

    monkeypatch.setattr(mpi, "find_mpiexec", no_mpiexec)
    form = BackendForm()
    form.fields["workers"].value = "1"
    first = form.apply()
    assert first is not None and first is dash.current_master(create=False)
    form.backend.value = "mpi"
    form.fields["workers"].value = "2"
    assert form.apply() is None  # no traceback out of the button's callback
    status = form.status.value
    assert "starting" not in status
    assert "backend mpi not started: FileNotFoundError: no mpiexec found" in status
    assert "no mpiexec found" in form.errors["mpiexec"].value  # beside the field it is about
    assert form.errors["workers"].value == ""
    # The master in use is still the old one, and still open.
    assert dash.current_master(create=False) is first and not first.closed

    def broken(backend, options):
        raise RuntimeError("the cluster is down")

    other = BackendForm(on_apply=broken)
    assert other.apply() is None
    assert "RuntimeError: the cluster is down" in other.status.value
    assert all(box.value == "" for box in other.errors.values())
    # An option's error raised while making the master goes beside its field.
    other = BackendForm(on_apply=lambda b, o: (_ for _ in ()).throw(
        ValueError("option 'retries': 7 is too many here")))
    assert other.apply() is None
    assert "7 is too many here" in other.errors["retries"].value


def test_interpreter_and_mpiexec_paths_must_be_executables(tmp_path):
    import sys

    from pymw_magic import Master

    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    for backend, option in (("local", "python"), ("mpi", "mpiexec")):
        for bad in ("/nonexistent/" + option, str(plain), str(tmp_path)):
            with pytest.raises(ValueError, match=rf"option '{option}': .* is not an executable file"):
                Master(backend, workers=1, **{option: bad})
    form = BackendForm(on_apply=lambda b, o: pytest.fail("must not apply"))
    form.fields["python"].value = "/nonexistent/python"
    assert form.apply() is None
    assert "is not an executable file" in form.errors["python"].value
    form.backend.value = "mpi"
    form.fields["mpiexec"].value = "/nonexistent/mpiexec"
    assert form.apply() is None
    assert "is not an executable file" in form.errors["mpiexec"].value
    # A real interpreter (by path or by name on PATH) is accepted.
    from pymw_magic.backends import get_backend
    assert get_backend("local").options["python"].convert(sys.executable) == sys.executable
    assert get_backend("local").options["python"].convert("sh") == "sh"


# --- every live master's jobs ---------------------------------------------------------------

def test_dashboard_lists_the_jobs_of_every_live_master(fallback):
    from pymw_magic import Master

    default = dash.use_master("local", {"workers": 1})
    own = Master("local", workers=1)
    d = Dashboard(ticker=Ticker(3600))
    try:
        assert own in dash.kernel_masters() and default in dash.kernel_masters()
        mapped = own.map_async(abs, range(-5, 0), name="own-master-job")
        assert default.submit(abs, -3).result(60) == 3
        assert mapped.wait(60)
        d.tick()
        names = [v.job.name for v in d.jobs_box.children]
        assert {"own-master-job", "submit:abs"} <= set(names)
        assert {label.split(": ", 1)[1] for label, _ in d.job_select.options} == set(names)
        own.shutdown()  # a master shut down drops out
        d.tick()
        names = [v.job.name for v in d.jobs_box.children]
        assert "submit:abs" in names and "own-master-job" not in names
    finally:
        d.close()
        own.shutdown(wait=True, cancel_futures=True)


# --- results stream into the sweep's plot ---------------------------------------------------

def _gated(seed: int, gates: str = "", rate: float = 1.0) -> float:
    """Waits for the file ``gates/<seed // 50>``: the test lets results out 50 at a time."""
    import os
    import random
    while not os.path.exists(os.path.join(gates, str(seed // 50))):
        time.sleep(0.005)
    return random.Random(seed).expovariate(rate)


def test_sweep_results_stream_into_the_plot_while_its_job_runs(master, tmp_path):
    pytest.importorskip("matplotlib")
    gates = tmp_path / "gates"
    gates.mkdir()
    sw = Sweep(functools.partial(_gated, gates=str(gates)), range(200), master=master, chunksize=1,
               ticker=Ticker(0.05), rate=(0.5, 2.0, 0.5))
    images: list[bytes] = []
    sw.image.observe(lambda change: images.append(change["new"]), names="value")
    try:
        job = sw.job
        for step in range(1, 4):  # the job is still running at each of these redraws
            (gates / str(step - 1)).touch()
            _eventually(lambda: f"rate=1.0: {50 * step}/200 results" in sw.summary.value,
                        f"the plot shows {50 * step} results")
            assert not job.done()
            assert images and images[-1][:8] == b"\x89PNG\r\n\x1a\n"
        assert len(set(images)) >= 3  # a new picture for each batch of results
        (gates / "3").touch()
        assert job.wait(60)
        _eventually(lambda: "rate=1.0: 200/200 results" in sw.summary.value, "the last redraw")
    finally:
        for g in range(4):
            (gates / str(g)).touch()
        sw.close()


# --- no listener on the job's hot path --------------------------------------------------

def _gate(arg: tuple) -> int:
    """Returns at once for i < 3, else once the gate file exists (at most 120 s)."""
    import os
    gate, i = arg
    deadline = time.monotonic() + 120
    while i >= 3 and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return i


@pytest.fixture
def unrecorded_master(monkeypatch):
    """A master the job store does not listen to (its recorder is a listener
    of its own, measured in bench/store.py): only the views' listeners count."""
    from pymw_magic import Master
    monkeypatch.setenv("PYMW_STORE", "0")
    m = Master("local", workers=2)
    try:
        yield m
    finally:
        m.shutdown(wait=True, cancel_futures=True)


def test_a_shown_dashboard_and_job_view_add_no_listener_yet_follow_the_job_live(unrecorded_master, tmp_path):
    """A listener on the master's event bus has every batch build and send
    events (the dashboard's fixed cost per job): the views read the jobs'
    counts at their ticks instead, and still show progress as it happens
    and the final state."""
    from pymw_magic.widgets.jobview import JobView

    gate = str(tmp_path / "open")
    ticker = Ticker(3600)   # no background ticks: the test drives them
    d = Dashboard(masters=lambda: [unrecorded_master], ticker=ticker, delay=0)
    job = unrecorded_master.map_async(_gate, [(gate, i) for i in range(8)], chunksize=1, name="gated")
    view = JobView(job, ticker=ticker)
    try:
        assert not unrecorded_master.events   # nobody listens: the scheduler builds no event
        _eventually(lambda: job.counts()["done"] == 3, "three tasks done")
        d.tick()
        rows = {row.job.name: row for row in d.jobs_box.children}
        assert d.job_select.value is job and "gated" in rows
        for shown in (view, rows["gated"]):
            shown.tick()
            assert "done 3" in shown.bar.value and "running" in shown.bar.value
        assert d.task_table.job is job and d.task_table.table.value.count(">done<") == 3
        with open(gate, "w"):
            pass
        assert job.wait(60)
        d.tick()
        for shown in (view, rows["gated"]):
            shown.tick()
            assert "job &#x27;gated&#x27; finished: done 8" in shown.bar.value
        assert d.task_table.table.value.count(">done<") == 8
        assert not unrecorded_master.events
    finally:
        job.cancel()
        view.close()
        d.close()
