"""A caller waiting in ``Future.result()`` reads its own task's reply: the
answer does not pass through the serving thread.  Behaviour only (which
thread read the reply, and every hostile case still ends right); speed is
measured in ``bench/hotpath.py``."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import CancelledError, TimeoutError as FuturesTimeout, wait

import psutil
import pytest

from conftest import wait_until
from pymw_magic import Master
from pymw_magic.errors import ShutDownError, WorkerLost
from pymw_magic.task import TaskFuture


def square(x):
    return x * x


def touch_then_sleep(path, x, seconds=300):
    open(path, "a").close()
    time.sleep(seconds)
    return x


def touch_then_wait(path, gate, x):
    """Touches ``path``, then returns ``x`` once the file ``gate`` exists (at most 120 s)."""
    open(path, "a").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def slow_first_time(marker, x):
    """Sleeps on its first attempt (marker absent), returns at once on a retry."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(300)
    return x


def _worker_pids():
    return [p.pid for p in psutil.Process().children()
            if "pymw_magic.worker" in " ".join(p.cmdline())]


def _task_of(m, first_arg):
    [task] = [t for j in m.submit_jobs for t in j.tasks if t.args and t.args[0] == first_arg]
    return task


def _idle(m):
    wait_until(lambda: len(m._scheduler._waiting) == m._scheduler.workers, timeout=60,
               what="every worker to idle")


def test_the_caller_reads_its_own_reply():
    """On an idle worker, submit() sends and result() reads: the reply is
    reported on the caller's thread (its done-callbacks run there), not
    on the serving thread."""
    with Master("local", workers=1) as m:
        assert isinstance(m.submit(square, 1), TaskFuture)
        assert m.submit(square, 2).result(timeout=60) == 4
        reads = m.backend.reads
        caller0, serving0 = reads["caller"], reads["serving"]
        me = threading.current_thread()
        ran_on = []
        for i in range(100):
            _idle(m)
            f = m.submit(square, i)
            f.add_done_callback(lambda _f: ran_on.append(threading.current_thread()))
            assert f.result(timeout=60) == i * i
        # (the serving thread may win the race for the odd batch, on a loaded machine)
        assert reads["caller"] - caller0 >= 80, (reads, caller0, serving0)
        assert ran_on.count(me) >= 80
        [job] = m.submit_jobs
        counts = job.counts()
        assert counts["done"] == 102 and counts["running"] == 0


def test_futures_never_waited_with_result_still_complete():
    """wait(), as_completed() and callbacks do not read: the serving thread
    takes the batch over."""
    with Master("local", workers=2) as m:
        for i in range(50):
            f = m.submit(square, i)
            done, _ = wait([f], timeout=60)
            assert done == {f} and f.result(timeout=0) == i * i
        got = threading.Event()
        m.submit(square, 7).add_done_callback(lambda f: got.set())
        assert got.wait(60)


def test_result_timeout_leaves_the_reply_to_the_serving_thread(tmp_path):
    """result(timeout=) on the fast path times out on time; the task goes
    on and its reply comes back through the serving thread."""
    with Master("local", workers=1) as m:
        assert m.submit(square, 1).result(timeout=60) == 1
        for trial in range(3):
            _idle(m)
            started, gate = tmp_path / f"s{trial}", tmp_path / f"g{trial}"
            f = m.submit(touch_then_wait, str(started), str(gate), trial)
            t0 = time.monotonic()
            with pytest.raises(FuturesTimeout):
                f.result(timeout=0.2)
            took = time.monotonic() - t0
            # (the task runs until the gate opens, at most 120 s: it did not
            # wait for it; a bound in seconds raced a loaded machine)
            assert took < 60 and not f.done(), (took, f)
            gate.touch()
            done, _ = wait([f], timeout=60)
            assert done == {f} and f.result(timeout=0) == trial


@pytest.mark.parametrize("retries", [0, 1])
def test_worker_killed_while_the_caller_reads_its_reply(tmp_path, retries):
    """The caller is blocked reading the worker's pipe when the worker is
    killed: the task is charged and retried (or fails with WorkerLost),
    the caller gets the outcome and never hangs."""
    m = Master("local", workers=1, retries=retries)
    try:
        assert m.submit(square, 1).result(timeout=60) == 1
        for trial in range(3):
            _idle(m)
            marker = tmp_path / f"m{trial}-{retries}"
            caller0 = m.backend.reads["caller"]
            f = m.submit(slow_first_time, str(marker), trial)
            task = _task_of(m, str(marker))
            outcome = []

            def reader():
                try:
                    outcome.append(f.result(timeout=120))
                except BaseException as exc:  # checked below
                    outcome.append(exc)

            t = threading.Thread(target=reader)
            t.start()
            wait_until(marker.exists, timeout=60, what="the task to start")
            # (the reader is in result(): it has claimed the reply, or the
            # serving thread has the batch; either way the kill must end well)
            [pid] = _worker_pids()
            os.kill(pid, signal.SIGKILL)
            t.join(timeout=120)
            assert not t.is_alive(), "result() hung after its worker was killed"
            if retries:
                assert outcome == [trial]
            else:
                assert len(outcome) == 1 and isinstance(outcome[0], WorkerLost), outcome
            assert task.attempts == 1 + retries
            assert m.backend.reads["caller"] >= caller0   # (the counter never goes back)
            wait_until(lambda: len(_worker_pids()) == 1, timeout=60, what="the replacement worker")
    finally:
        m.terminate()


def test_cancel_of_a_running_task_while_the_caller_reads(tmp_path):
    """Another thread cancels the task the caller is reading the reply of:
    the worker is stopped and result() raises CancelledError."""
    m = Master("local", workers=1)
    try:
        assert m.submit(square, 1).result(timeout=60) == 1
        for trial in range(3):
            _idle(m)
            started = tmp_path / f"c{trial}"
            f = m.submit(touch_then_sleep, str(started), trial)
            task = _task_of(m, str(started))
            canceller = threading.Thread(target=lambda: (
                wait_until(started.exists, timeout=60, what="the task to start"),
                m._scheduler.cancel([task])))
            canceller.start()
            with pytest.raises(CancelledError):
                f.result(timeout=120)
            canceller.join(timeout=60)
            assert task.state.value == "cancelled"
            assert m.submit(square, trial).result(timeout=120) == trial * trial
    finally:
        m.terminate()


def test_interrupt_in_result_on_the_fast_path(tmp_path):
    """Ctrl-C while the main thread waits in result() on the fast path:
    KeyboardInterrupt is raised, and the task still ends (its reply is then
    read by the serving thread); the master stays usable."""
    with Master("local", workers=1) as m:
        assert m.submit(square, 1).result(timeout=60) == 1
        main = threading.main_thread().ident
        for trial in range(3):
            _idle(m)
            started, gate = tmp_path / f"i{trial}", tmp_path / f"ig{trial}"
            # (the task runs until the gate opens: a task of a fixed 1.5 s
            # could end before a loaded machine delivered the Ctrl-C)
            f = m.submit(touch_then_wait, str(started), str(gate), trial)
            go = threading.Event()
            sent: list[float] = []
            interrupter = threading.Thread(target=lambda: (
                go.wait(60), wait_until(started.exists, timeout=60, what="the task to start"),
                sent.append(time.monotonic()), signal.pthread_kill(main, signal.SIGINT)))
            interrupter.start()
            caller0 = m.backend.reads["caller"]
            with pytest.raises(KeyboardInterrupt):
                go.set()
                f.result(timeout=120)
            # (promptly: a Ctrl-C that landed as the wait began was held until
            # the timeout ran out, 120 s later)
            took = time.monotonic() - sent[0]
            assert took < 30, f"the Ctrl-C was raised {took:.0f} s after it came"
            interrupter.join(timeout=60)
            assert not interrupter.is_alive() and not f.done()
            gate.touch()
            done, _ = wait([f], timeout=60)
            assert done == {f} and f.result(timeout=0) == trial
            assert m.backend.reads["caller"] == caller0   # (the serving thread read it)
        assert m.submit(square, 3).result(timeout=60) == 9


def test_interrupts_at_random_moments_in_result_never_lose_a_task():
    """SIGINT lands at any moment of result() on tiny tasks (while the reply
    is read and reported too): every future still ends with its value,
    the task states add up, and nothing hangs.  (Only inside result():
    an interrupt elsewhere is the test's, not the library's.)"""
    with Master("local", workers=1) as m:
        assert m.submit(square, 1).result(timeout=60) == 1
        main = threading.main_thread().ident
        stop = threading.Event()
        gate = threading.Lock()
        inside = threading.Event()
        sent = [0]

        def pester():
            k = 0
            while not stop.is_set():
                k += 1
                time.sleep(0.00005 * (k % 11))   # (every few tens to hundreds of microseconds)
                with gate:
                    if inside.is_set():
                        signal.pthread_kill(main, signal.SIGINT)
                        sent[0] += 1

        futures, interrupts = [], 0
        t = threading.Thread(target=pester)
        t.start()
        try:
            for i in range(400):
                f = m.submit(square, i)
                futures.append((i, f))
                try:
                    try:
                        inside.set()
                        f.result(timeout=60)
                    finally:
                        while True:
                            try:
                                with gate:
                                    inside.clear()
                                break
                            except KeyboardInterrupt:
                                interrupts += 1
                except KeyboardInterrupt:
                    interrupts += 1
        finally:
            stop.set()
            t.join(timeout=60)
        assert interrupts > 0 and sent[0] > 0
        done, not_done = wait([f for _, f in futures], timeout=120)
        assert not not_done
        for i, f in futures:
            assert f.result(timeout=0) == i * i
        [job] = m.submit_jobs
        counts = job.counts()
        assert counts["running"] == 0 and counts["pending"] == 0
        assert counts["done"] == len(futures) + 1
        assert m.submit(square, 5).result(timeout=60) == 25


def test_many_threads_reading_replies_of_one_worker(fast_switching):
    """Threads race for one worker's replies (the same future from two
    threads too): every result is right, every task ran once."""
    with Master("local", workers=1) as m:
        assert m.submit(square, 1).result(timeout=60) == 1
        results: dict[int, int] = {}
        errors = []

        def client(base):
            try:
                for i in range(base, base + 40):
                    f = m.submit(square, i)
                    other = threading.Thread(target=lambda: results.setdefault(-i - 1, f.result(timeout=120)))
                    other.start()
                    results[i] = f.result(timeout=120)
                    other.join(timeout=120)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k * 1000,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        mine = {i: v for i, v in results.items() if i >= 0}
        assert mine == {i: i * i for k in range(6) for i in range(k * 1000, k * 1000 + 40)}
        for i in mine:
            assert results[-i - 1] == i * i
        for task in m.submit_jobs[0].tasks:
            assert task.attempts == 1 and task.state.value == "done"


@pytest.mark.parametrize("how", ["terminate", "shutdown-nowait", "shutdown-cancel"])
def test_shutdown_or_terminate_while_a_caller_reads(tmp_path, how):
    """A thread is in result() on the fast path when the master is stopped:
    it gets the outcome that stop implies, never hangs."""
    m = Master("local", workers=1)
    try:
        assert m.submit(square, 1).result(timeout=60) == 1
        _idle(m)
        started = tmp_path / "s"
        f = m.submit(touch_then_sleep, str(started), 5, 300 if how == "terminate" else 0.5)
        outcome = []

        def reader():
            try:
                outcome.append(f.result(timeout=120))
            except BaseException as exc:  # checked below
                outcome.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        wait_until(started.exists, timeout=60, what="the task to start")
        if how == "terminate":
            m.terminate()
        elif how == "shutdown-nowait":
            m.shutdown(wait=False)
        else:
            m.shutdown(wait=True, cancel_futures=True)
        t.join(timeout=120)
        assert not t.is_alive(), "result() hung across " + how
        if how == "terminate":
            assert len(outcome) == 1 and isinstance(outcome[0], (ShutDownError, CancelledError)), outcome
        else:
            assert outcome == [5]   # (a running task finishes)
    finally:
        m.terminate()


@pytest.mark.parametrize("where", ["recv", "completed"])
def test_ctrl_c_while_the_caller_reads_and_reports_is_held_back(where):
    """A Ctrl-C that comes while the main thread reads a reply or reports
    it is raised once that is done: the task is done with its value (not
    lost with the reply it had consumed), and the worker is kept."""
    with Master("local", workers=1) as m:
        assert m.submit(square, 1).result(timeout=60) == 1
        pids = _worker_pids()
        for trial in range(5):
            _idle(m)
            armed = [True]
            target = m._scheduler if where == "completed" else m.backend._conns[m.backend.worker_info()[0]["name"]]
            real = getattr(target, where)

            def hit(*args, real=real, armed=armed, **kwargs):
                if armed[0] and threading.current_thread() is threading.main_thread():
                    armed[0] = False
                    signal.raise_signal(signal.SIGINT)
                return real(*args, **kwargs)

            setattr(target, where, hit)
            try:
                f = m.submit(square, trial)
                task = [t for j in m.submit_jobs for t in j.tasks if t.args == (trial,)][-1]
                with pytest.raises(KeyboardInterrupt):
                    f.result(timeout=60)
            finally:
                delattr(target, where)
            assert not armed[0]   # (the caller did read it)
            assert f.done() and f.result(timeout=0) == trial * trial
            assert task.attempts == 1 and task.state.value == "done"
        assert _worker_pids() == pids
        assert m.submit(square, 9).result(timeout=60) == 81


def test_a_done_callback_run_by_the_reading_caller_may_shut_down_and_submit():
    """Callbacks run on the caller's thread when it reports the reply:
    shutdown(wait=True) there returns at once (as on a serving thread) and
    result() of a task that worker has not run yet does not wait for the
    worker the caller holds."""
    for _ in range(5):
        m = Master("local", workers=1)
        try:
            assert m.submit(square, 1).result(timeout=60) == 1
            _idle(m)
            seen = []
            f = m.submit(square, 3)

            def callback(done_future):
                seen.append(threading.current_thread())
                m.shutdown(wait=True)

            f.add_done_callback(callback)
            assert f.result(timeout=60) == 9
            wait_until(lambda: seen, timeout=60, what="the callback")
            with pytest.raises(RuntimeError, match="after shutdown"):
                m.submit(square, 2)
        finally:
            m.terminate()


def test_a_task_with_a_time_limit_is_watched_by_the_serving_thread(tmp_path):
    """A job timeout needs the serving thread to watch the worker's slot:
    the caller leaves such a reply to it, and the limit is enforced."""
    from pymw_magic.errors import TaskTimeout

    with Master("local", workers=1, timeout=3.0, retries=0) as m:
        assert m.submit(square, 2).result(timeout=60) == 4
        caller0 = m.backend.reads["caller"]
        for trial in range(3):
            _idle(m)
            assert m.submit(square, trial).result(timeout=60) == trial * trial
            _idle(m)
            f = m.submit(touch_then_sleep, str(tmp_path / f"t{trial}"), trial, 30)
            with pytest.raises(TaskTimeout):
                f.result(timeout=60)
        assert m.backend.reads["caller"] == caller0


def test_a_ctrl_c_held_back_while_claiming_is_raised_when_the_claim_finds_nothing(tmp_path):
    """A Ctrl-C that comes while result() tries to claim its task's reply
    (held back there) is raised even when the claim finds nothing to read
    (the serving thread took the batch over): it was dropped, and result()
    waited for the task as if no Ctrl-C had come."""
    with Master("local", workers=1) as m:
        assert m.submit(square, 1).result(timeout=60) == 1
        sched = m._scheduler
        for trial in range(3):
            _idle(m)
            started, gate = tmp_path / f"c{trial}", tmp_path / f"cg{trial}"
            f = m.submit(touch_then_wait, str(started), str(gate), trial)
            wait_until(started.exists, timeout=60, what="the task to start")

            def claim_then_find_nothing(task):
                os.kill(os.getpid(), signal.SIGINT)   # (Ctrl-C, while the claim holds it back)
                return None
            sched.claim_reply = claim_then_find_nothing
            try:
                with pytest.raises(KeyboardInterrupt):
                    f.result(timeout=5)
            finally:
                del sched.claim_reply
            assert not f.done()
            gate.touch()
            assert f.result(timeout=60) == trial
