"""The simulator from the notebook: the magics' options, ``%pymw tune`` and the
tuning widget, and ``examples/notebooks/simulation_tuning.ipynb`` executed in
a real kernel (nbclient)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython

from pymw_magic import tune
from pymw_magic.widgets.tuning import Tuner


@pytest.fixture
def ip():
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "pymw_magic")
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "pymw_magic")


def test_use_simulator_with_string_options(ip, capsys):
    ip.run_line_magic("pymw", "use simulator --workers 8 --speeds lognormal:1,0.5 --availability onoff:50,10 "
                             "--failure-rate 0.1 --retries 10 --latency 0.01 --overhead 0.001 --seed 3")
    assert "backend 'simulator' with 8 worker(s)" in capsys.readouterr().out
    ip.run_cell_magic("pymw", "--map x in range(20) --out lengths", "x / 10")
    assert ip.user_ns["lengths"] == [x / 10 for x in range(20)]   # PyMW convention: the value is the length
    report = ip.user_ns["_pymw_job"].report()
    assert report.tasks == 20 and len(report.hosts) == 8


def test_use_simulator_with_a_notebook_function_as_the_duration_and_churn(ip, capsys):
    ip.run_cell("def model(x):\n    return 2.0 * x\n")
    ip.run_line_magic("pymw", "use simulator --workers 2 --duration model --churn 1e9")
    assert "backend 'simulator' with 2 worker(s)" in capsys.readouterr().out
    ip.run_cell_magic("pymw", "--map x in range(4) --out t", "x")
    assert ip.user_ns["t"] == [0.0, 2.0, 4.0, 6.0]           # the model's run times
    assert ip.user_ns["_pymw_job"].report().makespan == 8.0
    with pytest.raises(UsageError, match="--duration.*'nothing_here'.*notebook"):
        ip.run_line_magic("pymw", "use simulator --duration nothing_here")
    with pytest.raises(UsageError, match="--churn"):
        ip.run_line_magic("pymw", "use simulator --churn -5")


def test_tune_takes_an_availability_fraction_or_spec(ip):
    tuner = ip.run_line_magic("pymw", "tune --tasks 200 --hosts 8 --availability 0.5")
    assert tuner.value("availability") == 0.5 and tuner.options()["availability"].startswith("onoff:")
    tuner = ip.run_line_magic("pymw", "tune --tasks 200 --hosts 8 --availability onoff:30,10")
    assert tuner.value("availability") == 0.75 and tuner.options()["availability"] == "onoff:30,10"
    tuner = ip.run_line_magic("pymw", "tune --tasks 200 --hosts 8 --availability periodic:10,10")
    assert tuner.options()["availability"] == "periodic:10,10" and tuner.controls["availability"].disabled
    assert tuner.report.lost > 0
    assert ip.run_line_magic("pymw", "tune --tasks 50 --hosts 2 --availability always").options()[
        "availability"] == "always"
    with pytest.raises(UsageError, match="--availability.*sometimes"):
        ip.run_line_magic("pymw", "tune --availability sometimes")


def test_a_cell_on_the_simulator_with_a_constant_duration(ip):
    ip.run_cell_magic("pymw", "--backend simulator --workers 3 --duration 2 --map x in range(7) --out t", "x")
    assert ip.user_ns["t"] == [2.0] * 7
    assert ip.user_ns["_pymw_job"].report().makespan == 6.0


@pytest.mark.parametrize("line, expected", [
    ("use simulator --speeds lognormal:fast", ["--speeds", "lognormal:MEDIAN,SIGMA"]),
    ("use simulator --speeds -1", ["--speeds", "> 0"]),
    ("use simulator --failure-rate 1.5", ["--failure-rate", "[0, 1)"]),
    ("use simulator --availability sometimes", ["--availability", "onoff:UP,DOWN"]),
    ("use simulator --duration forever", ["--duration", "measure"]),
    ("use simulator --bogus 1", ["--bogus", "--speeds", "--availability"]),
    ("tune --hosts many", ["--hosts", "whole number"]),
    ("tune --bogus 1", ["--bogus", "--policy"]),
])
def test_bad_simulator_options_are_usage_errors(ip, line, expected):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("pymw", line)
    for word in expected:
        assert word in str(info.value)


def test_pymw_tune_magic_returns_a_tuner(ip):
    tuner = ip.run_line_magic("pymw", "tune --tasks 300 --hosts 12 --policy longest-first --seed 2")
    assert isinstance(tuner, Tuner) and tuner.policy == "longest-first"
    assert tuner.report.tasks == 300 and len(tuner.report.hosts) == 12
    ip.user_ns["length"] = lambda x: x
    tuner = ip.run_line_magic("pymw", "tune length range(1,21) --hosts 4")
    assert sum(tuner.works) == sum(range(1, 21))


def test_tuner_controls_rerun_and_redraw():
    tuner = tune(tasks=2000, work="uniform:0.5,1.5", hosts=50)
    first = tuner.report
    assert "makespan" in tuner.summary.value and tuner.chart.value.startswith("<svg")
    tuner.controls["hosts"].value = 100               # as a slider drag would
    assert tuner.report is not first and len(tuner.report.hosts) == 100
    assert tuner.report.makespan < first.makespan
    r = tuner.set(failure_rate=0.2, availability=0.5, spread=0.8, chunksize=4, policy="shortest-first")
    assert r.failures > 0 and r.params["policy"] == "shortest-first" and r.params["chunksize"] == 4
    assert tuner.options()["availability"].startswith("onoff:")
    assert len(tuner.history) == 3 and "shortest-first" in str(tuner.compare())
    again = tuner.set(seed=tuner.value("seed"))        # same controls, same trace
    assert again.to_csv() == r.to_csv()
    with pytest.raises(ValueError, match="unknown control"):
        tuner.set(colour="red")


def test_the_simulation_tuning_notebook_runs(tmp_path, monkeypatch):
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    from test_notebooks import NOTEBOOKS, find, run_notebook, text_of  # the shared runner

    import json
    import os
    import sys
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pymw-magic tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    root = str(NOTEBOOKS.parent.parent)
    monkeypatch.setenv("PYTHONPATH", root + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""))
    nb, _ = run_notebook(NOTEBOOKS / "simulation_tuning.ipynb")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors, "\n".join("\n".join(e["traceback"]) for e in errors)
    assert "tasks on 50 hosts" in text_of(find(nb, "report = pm.simulate"))
    assert "<svg" in find(nb, "report.timeline()").outputs[0]["data"]["text/html"]
    table = text_of(find(nb, "policies = "))
    assert all(p in table for p in ("fifo", "longest-first", "round-robin")) and "best makespan:" in table
    assert "backend 'simulator' with 20 worker(s)" in text_of(find(nb, "%pymw use simulator"))
    assert "'done': 200" in text_of(find(nb, "job = _pymw_job"))
    assert text_of(find(nb, "print(r.to_csv()")).strip() == "task,host,start,end,outcome"
    assert "longest-first on 150 hosts" in text_of(find(nb, "before = "))
    widget_outputs = find(nb, "tuner = pm.tune").outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in widget_outputs)
    assert "deployed policy: longest-first -> 2500" in text_of(find(nb, "with tuner.deploy"))
    history = text_of(find(nb, "print(tuner.compare())"))
    assert "fifo, 100 hosts" in history and "longest-first, 150 hosts" in history
    tune_magic = find(nb, "%pymw tune").outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in tune_magic)
    churn = text_of(find(nb, "churned = "))
    assert "lost attempts per task" in churn and "failed tasks: 0" in churn
