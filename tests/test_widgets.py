"""The inline job widget under a real kernel (nbclient): what the front end
holds for a finished, a failed, a running and a cancelled job, the Cancel
button clicked through the comm channel — also while a blocking ``%%pymw``
cell waits — and the bound on widget update messages for a 20,000-task job.

What is asserted is the widgets' state as the front end receives it
(nbclient keeps ``widget_state`` from the kernel's comm messages), or the
raw comm messages read off the kernel's IOPub channel — never timings.
"""

from __future__ import annotations

import json
import re
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_notebooks import ROOT, kernel_env  # noqa: E402,F401 - the fixture


class Notebook:
    """Cells executed one at a time in one real kernel, like a user would."""

    def __init__(self, client: nbclient.NotebookClient):
        self.client = client
        self.nb = client.nb

    def run(self, source: str) -> nbformat.NotebookNode:
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell

    def state(self, ref: str) -> dict:
        """A widget model's state as the front end holds it (``IPY_MODEL_…``
        references accepted)."""
        return self.client.widget_state[ref.removeprefix("IPY_MODEL_")]

    def shown_widget(self, cell) -> dict:
        """The state of the widget a cell displayed."""
        views = [o for o in cell.outputs if o["output_type"] in ("display_data", "execute_result")
                 and "application/vnd.jupyter.widget-view+json" in o["data"]]
        assert views, f"the cell shows no widget: {cell.outputs}"
        return self.state(views[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"])

    def printed(self, cell) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")


@pytest.fixture
def notebook(kernel_env):  # noqa: F811
    nb = nbformat.v4.new_notebook()
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel():
        book = Notebook(client)
        book.run("%load_ext pymw_magic\n%pymw use local --workers 2")
        yield book
        book.run("%pymw cancel\n%unload_ext pymw_magic")  # stops what a failed test left running


def _job_view(book: Notebook, cell) -> tuple[dict, dict, dict]:
    """(the JobView box, its bar, its cancel button) as the front end has them."""
    box = book.shown_widget(cell)
    assert "pymw-jobview" in box["_dom_classes"]
    bar, button = (book.state(ref) for ref in box["children"])
    return box, bar, button


def test_finished_and_failed_jobs_settle_into_a_summary(notebook):
    done = notebook.run("%%pymw --map x in range(50) --out squares --name squares\nx * x")
    _, bar, button = _job_view(notebook, done)
    assert "pymw-job-finished" in bar["value"]
    assert "job &#x27;squares&#x27; finished: done 50 in" in bar["value"]
    assert 'class="pymw-seg pymw-seg-done" title="done 50"' in bar["value"]
    # The cancel button is disabled and hidden once the job has ended.
    assert button["disabled"] is True
    assert notebook.state(button["layout"])["display"] == "none"
    # The text of the cell (tasks' output) still follows the widget.
    assert [o for o in done.outputs if o["output_type"] == "error"] == []

    failed = notebook.run("%%pymw --map x in [1, 0, 2, 4] --name ratios\n12 / x")
    assert [o["ename"] for o in failed.outputs if o["output_type"] == "error"] == ["ZeroDivisionError"]
    _, bar, button = _job_view(notebook, failed)
    assert "pymw-job-failed" in bar["value"]
    assert "job &#x27;ratios&#x27; failed: done 3, failed 1" in bar["value"]
    assert 'title="failed 1"' in bar["value"] and 'title="done 3"' in bar["value"]
    assert button["disabled"] is True


def test_running_job_and_the_cancel_button(notebook):
    notebook.run("%%pymw --map x in range(6) --nowait --out sleepy --name sleepy\n"
                 "import time\ntime.sleep(60)\nx")
    shown = notebook.run(
        "import time\nfrom pymw_magic.widgets.jobview import JobView\n"
        "while sleepy.counts()['running'] < 2:\n    time.sleep(0.02)\n"
        "view = JobView(sleepy)\nview")
    box, bar, button = _job_view(notebook, shown)
    assert "pymw-job-active" in bar["value"] and "<b>sleepy</b>" in bar["value"]
    counts = re.search(r"pending (\d+), running (\d+) \u00b7", bar["value"])
    assert counts and int(counts[1]) + int(counts[2]) == 6 and int(counts[2]) >= 2, bar["value"]
    assert "tasks/s" in bar["value"] and "ETA" in bar["value"]
    assert button["description"] == "Cancel" and button["disabled"] is False
    assert notebook.state(button["layout"]).get("display") in (None, "")

    # Click the button as the front end does: a comm message to its model.
    kc = notebook.client.kc
    model_id = box["children"][1].removeprefix("IPY_MODEL_")
    kc.shell_channel.send(kc.session.msg("comm_msg", {
        "comm_id": model_id, "data": {"method": "custom", "content": {"event": "click"}}}))
    after = notebook.run(
        "assert sleepy.wait(60)\n"
        "import json\n"
        "print(json.dumps({'states': sorted({t.state.value for t in sleepy.tasks}),\n"
        "                  'n': len(sleepy.tasks), 'counts': sleepy.counts(),\n"
        "                  'bar': view.bar.value, 'button': view.cancel_button.disabled}))")
    seen = json.loads(notebook.printed(after))
    # Every task was cancelled: the two running ones stopped, the four pending dropped.
    assert seen["states"] == ["cancelled"] and seen["n"] == 6
    assert seen["counts"]["cancelled"] == 6 and seen["counts"]["done"] == 0
    assert "job &#x27;sleepy&#x27; cancelled: cancelled 6" in seen["bar"] and seen["button"] is True


def test_a_job_displayed_in_a_cell_is_its_live_widget(notebook):
    """``Job._repr_mimebundle_``: a Job as a cell's last expression shows the
    job widget, following that job to its end."""
    cell = notebook.run("from pymw_magic.widgets.dashboard import current_master\n"
                        "shown = current_master().map_async(abs, range(-40, 0), name='shown')\n"
                        "shown")
    results = [o for o in cell.outputs if o["output_type"] == "execute_result"]
    assert len(results) == 1, cell.outputs
    data = results[0]["data"]
    assert data["text/plain"] == "pymw job 'shown'\n"  # where widgets do not render
    model_id = data["application/vnd.jupyter.widget-view+json"]["model_id"]
    box = notebook.state(model_id)
    assert "pymw-jobview" in box["_dom_classes"]
    # The widget is a JobView of that very job; once the job ends it settles.
    check = notebook.run(
        "import json\nfrom ipywidgets.widgets.widget import _instances\n"
        f"view = _instances[{model_id!r}]\n"
        "assert shown.wait(60)\nview.refresh()\n"
        "print(json.dumps({'kind': type(view).__name__, 'same': view.job is shown}))")
    assert json.loads(notebook.printed(check)) == {"kind": "JobView", "same": True}
    _, bar, button = (notebook.state(model_id), *(notebook.state(r) for r in box["children"]))
    assert "job &#x27;shown&#x27; finished: done 40" in bar["value"]
    assert button["disabled"] is True
    # Outside a kernel (a script, a terminal IPython) a Job is its repr.
    from pymw_magic.widgets.jobview import job_mimebundle

    class Plain:
        def __repr__(self):
            return "<Job 1 'plain' finished done=3>"

    assert job_mimebundle(Plain()) == {"text/plain": "<Job 1 'plain' finished done=3>"}


def test_cancel_button_stops_a_blocking_cell(kernel_env, tmp_path):  # noqa: F811
    """The button works while the cell that showed it still waits for its
    job (the cell awaits, so the kernel handles the click)."""
    from jupyter_client.manager import start_new_kernel

    from test_notebooks import _await_workers, _kernel_workers, _left_alive, _run

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        reply, out = _run(kc, "%load_ext pymw_magic\n%pymw use local --workers 2")
        assert reply["status"] == "ok", out
        workers = _await_workers(km, 2)
        marks = tmp_path / "started"
        marks.mkdir()
        cell = kc.execute(
            "%%pymw --map x in range(6) --out partial --name sleepy --chunksize 1\n"
            "import pathlib, time\n"
            "if x >= 2:\n"
            f"    pathlib.Path({str(marks)!r}, str(x)).touch()\n"
            "    time.sleep(120)\n"
            "x * 10")
        button = None
        while button is None:  # the cell shows its widget before it waits
            msg = kc.get_iopub_msg(timeout=60)
            content = msg["content"]
            if (msg["msg_type"] == "comm_open" and msg["parent_header"].get("msg_id") == cell
                    and content["data"]["state"].get("description") == "Cancel"):
                button = content["comm_id"]
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(marks.iterdir())) == 2  # both workers are inside a sleeping task
        # The click, as the front end sends it, while the cell still runs.
        kc.shell_channel.send(kc.session.msg("comm_msg", {
            "comm_id": button, "data": {"method": "custom", "content": {"event": "click"}}}))
        reply = kc.get_shell_msg(timeout=60)["content"]
        assert reply["status"] == "error" and reply["ename"] == "CancelledError", reply
        shown = "\n".join(reply["traceback"])
        assert "was cancelled: 2 of 6 task(s) had finished, 4 cancelled" in shown
        # The workers inside the sleeping tasks were stopped...
        assert not _left_alive(workers), "a worker running a cancelled task is still alive"
        # ...the finished results are bound, and nothing ran after the click.
        reply, out = _run(kc, "print(partial[:2], _pymw_job.counts()['done'], "
                              "_pymw_job.counts()['cancelled'])")
        assert reply["status"] == "ok", out
        assert out.strip() == "[0, 10] 2 4"
        assert len(list(marks.iterdir())) == 2
        # A %%pymw cell run by another cell magic still works (it blocks there).
        reply, out = _run(kc, "%%capture captured\n%%pymw --map x in range(3) --out nested\nx + 1")
        assert reply["status"] == "ok", out
        reply, out = _run(kc, "print(nested)")
        assert out.strip() == "[1, 2, 3]"
        spawned = _kernel_workers(km)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert not _left_alive(spawned), "workers outlived the kernel"


def _drain_updates(kc, until_idle_of: str) -> list[dict]:
    """IOPub messages up to the kernel going idle after ``until_idle_of``."""
    msgs = []
    while True:
        msg = kc.get_iopub_msg(timeout=120)
        msgs.append(msg)
        if (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == until_idle_of):
            return msgs


def test_widget_updates_for_a_20000_task_job_are_bounded(kernel_env):  # noqa: F811
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        def run(code: str) -> list[dict]:
            return _drain_updates(kc, kc.execute(code))

        run("%load_ext pymw_magic\n%pymw use local --workers 2\n"
            "from pymw_magic.widgets.dashboard import current_master\n"
            "events = [0]\n"
            "def count(event):\n    events[0] += 1\n"
            "current_master().events.subscribe(count)")

        def job_messages(code: str) -> tuple[int, dict]:
            """Widget update messages while ``code`` ran, and the job's figures."""
            msgs = run(code)
            errors = [m for m in msgs if m["msg_type"] == "error"]
            assert not errors, errors[0]["content"]["traceback"]
            updates = sum(1 for m in msgs if m["msg_type"] == "comm_msg"
                          and m["content"]["data"].get("method") == "update")
            stats = _printed(run, "import json\nprint(json.dumps({'events': events[0], "
                                  "'elapsed': _pymw_job.elapsed, 'done': _pymw_job.counts()['done']}))\n"
                                  "events[0] = 0")
            print(f"{code.splitlines()[0]!r}: {updates} widget updates, {stats}")
            return updates, stats

        # One task per batch, so the job lasts seconds: long enough for the
        # bound (rate x duration + a small slack) to tell a 4 Hz throttle
        # from a faster one, not only from none at all.
        cell = "%%pymw --map x in range(20000) --out r --chunksize 1\nx"

        # The inline widget alone.
        updates, stats = job_messages(cell)
        assert stats["done"] == 20000
        # Unthrottled, there would be an update per batch event (two per task).
        assert stats["events"] >= 20000
        # Throttled: at most one bar update per 0.25 s tick, plus the settling.
        assert updates <= 4 * stats["elapsed"] + 8, (updates, stats)

        # With the dashboard displayed too (a row, the task table).
        run("%pymw dashboard")
        run("board = _")
        updates, stats = job_messages(cell)
        assert stats["done"] == 20000 and stats["events"] >= 20000
        # Per tick: the inline bar, the dashboard's row, the task table's page
        # and label; new-job set-up (the dashboard's job list and selection).
        assert updates <= 4 * 4 * stats["elapsed"] + 20, (updates, stats)

        # And the timeline tab shown: the timeline at most once a second.
        run("board.details.selected_index = 1")
        updates, stats = job_messages(cell)
        assert stats["done"] == 20000
        assert updates <= 4 * 4 * stats["elapsed"] + stats["elapsed"] + 24, (updates, stats)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def _printed(run, code: str) -> dict:
    msgs = run(code)
    text = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    return json.loads(text)


def test_live_sweep_notebook(kernel_env):  # noqa: F811
    """The example's sweep, and its stale job read from its tasks' states:
    the notebook waits for the stale job's first results before moving the
    slider, so it is caught running.  Depends on the scheduler keeping the
    tasks sent ahead to a worker PENDING (cancellable) until it starts them."""
    import ast

    from test_notebooks import NOTEBOOKS, find, run_notebook, text_of

    nb, _ = run_notebook(NOTEBOOKS / "live_sweep.ipynb")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors, errors
    shown = find(nb, "import pymw_magic\n")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown.outputs)
    runs = text_of(find(nb, "import time\nfrom collections import Counter")).splitlines()
    assert len(runs) == 3
    assert runs[-1] == "{'r0': 3.0, 'population': 20000} 200 done, 0 cancelled"
    assert runs[1].startswith("{'r0': 2.25, 'population': 20000} ")

    line = text_of(find(nb, "_now = Counter(")).strip()
    found = re.fullmatch(r"stale job, (\d+) workers: when r0 moved (\{.*\}); at its end (\{.*\}); "
                         r"input never read: (\d+)", line)
    assert found, line
    workers, unread = int(found[1]), int(found[4])
    at_change, at_end = ast.literal_eval(found[2]), ast.literal_eval(found[3])
    assert workers == 2
    # Its first results were in when the slider moved, and it was still running.
    assert at_change.get("done", 0) >= 4
    # Right after the change, nothing of it is left pending: what had not
    # started was cancelled, and only the tasks its workers were inside
    # (one a worker, chunksize=1) still run...
    assert set(at_change) <= {"done", "running", "cancelled"}, at_change
    assert at_change.get("running", 0) <= workers, at_change
    # ...so at its end, it has at most that many more results: the rest of
    # the 200 were cancelled or never even read from its input.
    assert set(at_end) <= {"done", "cancelled"}, at_end
    assert at_end.get("done", 0) <= at_change.get("done", 0) + workers, (at_change, at_end)
    assert at_end.get("done", 0) + at_end.get("cancelled", 0) + unread == 200
    assert at_end.get("cancelled", 0) > 0
    assert text_of(find(nb, "sw.refresh()")).startswith("r0=3.0: 200 runs, mean final size 0.")
    magic = find(nb, "%pymw sweep")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in magic.outputs)
