"""The scheduler's rules as pure functions, one copy for every source of work.

The real :class:`~pymw_magic.scheduler.Scheduler` (with :class:`~pymw_magic.job.Job`)
and the simulator's light source (``simulation/engine.py``) apply the same
rules; they live here, with no state and no lock, so that both read them
from one place:

* :func:`window` / :func:`job_window` — how many of a job's tasks may exist
  (read from its input, not yet final) at once;
* :func:`refill_below` — the queue length under which a worker's request
  first reads more input;
* :func:`batch_size` / :func:`single_task_above` — how many tasks go to a
  worker in one batch (the :class:`~pymw_magic.policies.Chunking` rule, and
  the mean call length above which it always says one);
* :func:`lost_task` — what becomes of each task of a batch whose worker went
  away: retried, failed, or requeued uncharged (``MAX_REQUEUES``).

Each function matches the Scheduler's and Job's current code (``Job._window``,
``Scheduler.take``'s refill and chunking, ``Scheduler.lost``) exactly, so
that they can call it in place of their own copy.

Layer: beside ``policies``, ``events`` and ``job``; it imports nothing at
run time (``policies`` for the Chunking type only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .policies import Chunking

__all__ = ["WINDOW_MIN", "MAX_REQUEUES", "UNBOUNDED", "window", "job_window", "refill_below", "batch_size",
           "single_task_above", "lost_task", "RETRY", "FAIL", "TIMED_OUT", "PRESUMED", "REQUEUE"]

#: the smallest window, whatever the worker count
WINDOW_MIN = 64

#: uncharged requeues after which a task is failed anyway (a safety net:
#: the culprit of a worker death is normally known from the worker's slot)
MAX_REQUEUES = 6

#: the queue length Chunking is told when sizing a window: "as many as wanted"
UNBOUNDED = 1 << 30


def window(workers: int, batch: int) -> int:
    """How many unfinished tasks of one job may exist at once, for
    ``workers`` workers taking batches of ``batch`` tasks: four batches per
    worker, and never fewer than :data:`WINDOW_MIN`."""
    return max(WINDOW_MIN, 4 * workers * batch)


def job_window(chunking: Chunking, fn: Any, chunksize: int | None, workers: int) -> int:
    """:func:`window` for a job of function ``fn`` (its duration estimate,
    ``fn.mean``) and ``chunksize`` (None: adaptive): the batch is the size
    the chunking rule gives one worker with unlimited work queued — as
    ``Job._window`` computes it."""
    return window(workers, chunking.size(fn, chunksize, UNBOUNDED, 1))


def refill_below(workers: int) -> int:
    """A worker asking for work first reads more input when fewer than this
    many tasks are queued (two per worker); a finished batch refills too."""
    return 2 * workers


def batch_size(chunking: Chunking, fn: Any, chunksize: int | None, queued: int, workers: int,
               isolate: bool) -> int:
    """How many tasks the next batch takes, its first task included:
    ``queued`` counts that first task too.  A task under suspicion
    (``isolate``: its last run took a worker down) goes alone; otherwise the
    chunking rule (``chunksize`` when given)."""
    if isolate:
        return 1
    return chunking.size(fn, chunksize, queued, workers)


def single_task_above(chunking: Chunking) -> float:
    """The mean call length (seconds) above which adaptive chunking always
    gives batches of one, whatever the queue — its common case, which a
    hot loop may test inline with ``mean is None or mean > this``."""
    return chunking.target / 2


def send_ahead(chunking: Chunking, mean: float | None, others_idle: bool) -> bool:
    """Whether a worker still running a batch may be sent the next one now.

    Sending ahead hides the master's round trip between batches, which
    matters only for short calls; a task sent ahead waits behind the
    running batch while another worker may sit idle (two 3 s tasks on two
    workers took 6 s).  So never when another worker is idle or still
    starting (``others_idle``), nor when the calls of the batch the worker
    runs (``mean``, None while unknown) are known to be long: such batches
    hold one call (:func:`single_task_above`)."""
    if others_idle:
        return False
    return mean is None or mean <= single_task_above(chunking)


#: the fates of a lost batch's task (:func:`lost_task`)
RETRY = "retry"          # the culprit, retries left: RETRYING, then runs alone
FAIL = "fail"            # the culprit, retries used up: FAILED (WorkerLost)
TIMED_OUT = "timeout"    # the culprit ran past its timeout: FAILED (TaskTimeout)
PRESUMED = "presumed"    # never blamed, yet in hand at every death: FAILED (WorkerLost)
REQUEUE = "requeue"      # not to blame: PENDING again, its attempt uncharged (one more requeue)


def lost_task(*, culprit: bool, reason: str, attempts: int, retries: float, requeues: int,
              culprit_known: bool, several: bool) -> tuple[str, bool]:
    """What becomes of one task that was running in a batch whose worker
    went away (``Scheduler.lost``): ``(fate, isolate)``.

    ``culprit``: this is the task the worker was running; ``reason``:
    ``"died"`` (charge the culprit), ``"timeout"`` (the culprit ran too
    long) or ``"stopped"`` (stopped on purpose: charge nobody);
    ``attempts``: the task's attempts, this one included; ``retries``: how
    many retries its job allows; ``requeues``: its uncharged requeues so
    far; ``culprit_known``: whether the batch's culprit is known at all;
    ``several``: the batch held more than this one task (or the backend's
    workers die together).

    ``isolate`` says the task runs alone from now on: the culprit that is
    retried, and — when a worker died and the culprit is unknown — every
    task of a batch of several, so that the next death names it.
    """
    if culprit and reason != "stopped":
        if reason == "timeout":
            return TIMED_OUT, False
        if attempts <= retries:
            return RETRY, True
        return FAIL, False
    if reason == "died" and requeues >= MAX_REQUEUES:
        return PRESUMED, False
    return REQUEUE, not culprit_known and several and reason == "died"
