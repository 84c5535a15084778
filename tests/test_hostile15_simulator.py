"""Hostile checks of the simulator behind Master against simulate(): the
same scenario must give the same trace, on platforms the trace tests do not
cover (a finite bandwidth with a notebook's — ``__main__`` — function), and
odd inputs (no task, a model that raises)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pymw_magic import Master, simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A notebook's function lives in __main__: it travels by value, with its
# source; the trace's transfer times count those bytes on both sides.
MAIN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}]
    from pymw_magic import Master, simulate

    def work(x):
        return x

    items = [1 + (i % 7) / 3 for i in range(40)]
    opts = dict(duration=work, latency=0.01, bandwidth={bandwidth!r}, seed=3)
    one_call = simulate(work, items, hosts=4, **opts)
    with Master("simulator", workers=4, **opts) as m:
        job = m.map_async(work, items)
        assert job.wait(timeout=120)
        backend = job.report()
    print("SAME" if backend.to_csv() == one_call.to_csv() else "DIFFERENT")
    print(one_call.makespan, backend.makespan)
""")


@pytest.mark.parametrize("bandwidth", [1e6, 1e4])
def test_a_main_functions_bytes_cost_the_same_transfer_time_on_both_sides(tmp_path, bandwidth):
    script = tmp_path / "main.py"
    script.write_text(MAIN_SCRIPT.format(root=ROOT, bandwidth=bandwidth))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    first, makespans = out.stdout.split("\n")[:2]
    assert first == "SAME", f"simulate() and Master('simulator') differ (makespans {makespans})"


def work(x):
    return x


@pytest.mark.parametrize("duration", [1.0, work])
def test_no_task_gives_the_same_empty_report(duration):
    one_call = simulate(work, [], hosts=3, duration=duration)
    with Master("simulator", workers=3, duration=duration) as m:
        job = m.map_async(work, [])
        assert job.wait(timeout=60)
        backend = job.report()
        assert m.map_async(work, []).report(wait=False).done == 0
    assert backend.to_csv() == one_call.to_csv()
    assert backend.makespan == one_call.makespan == 0.0 and backend.done == 0
    assert not backend.partial


def test_no_host_is_refused_with_a_clear_message_on_both_sides():
    with pytest.raises(ValueError, match="host|worker"):
        simulate(work, [1.0], hosts=0, duration=work)
    with pytest.raises(ValueError, match="worker"):
        Master("simulator", workers=0, duration=work)


def pymw_length(x):
    """PyMW's convention: the task function returns its length."""
    return x


@pytest.mark.parametrize("fn,duration,how", [
    (work, work, "timeout"), (pymw_length, None, "timeout"),
    (work, work, "failures"), (pymw_length, None, "failures"),
    (work, "measure", "failures"),  # (measured lengths are microseconds: no timeout bites)
])
def test_a_failed_task_has_no_value_on_either_side(fn, duration, how):
    items = [1 + (i % 7) / 3 for i in range(40)]
    opts = dict(timeout=2.0) if how == "timeout" else dict(failure_rate=0.3, retries=0)
    one_call = simulate(fn, items, hosts=4, duration=duration, seed=3, **opts)
    with Master("simulator", workers=4, duration=duration, seed=3, **opts) as m:
        job = m.map_async(fn, items)
        assert job.wait(timeout=120)
        backend = job.report()
    for side, report in (("simulate()", one_call), ("Master('simulator')", backend)):
        failed = [i for i, s in enumerate(report.task_state) if s != 0]
        assert failed, "the scenario failed no task"
        assert [report.values[i] for i in failed] == [None] * len(failed), f"{side} gives failed tasks a value"
    if duration != "measure":  # (measured lengths differ from run to run)
        assert backend.to_csv() == one_call.to_csv()
        assert one_call.values == backend.values
