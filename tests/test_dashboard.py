"""The dashboard and live sweeps: the backend form generated from option
declarations, Apply through the magics' Session (in a real kernel) and
without it, the paged task table over 100,000 tasks, the job rows and
timeline, and a sweep cancelling its stale job's pending tasks."""

from __future__ import annotations

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
from tests.test_widgets import Notebook, notebook, kernel_env  # noqa: F401 - fixtures


@pytest.fixture
def fallback():
    """The module-level default master (no %load_ext), shut down afterwards."""
    yield dash._fallback
    master, dash._fallback["master"] = dash._fallback["master"], None
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
    assert [label for label, _ in form.fields["policy"].options] == [str(c) for c in declared["policy"].choices]
    assert all(form.fields[name].description == name for name in declared)

    form.fields["workers"].value = "two"
    form.fields["retries"].value = "-1"
    assert form.apply() is None
    assert "is not a whole number &gt;= 1" in form.errors["workers"].value
    assert "is not a whole number &gt;= 0" in form.errors["retries"].value
    assert form.errors["timeout"].value == ""
    assert "2 invalid value(s)" in form.status.value


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
