"""The exceptions pymw-magic raises, and how a remote failure is carried home.

Everything a user may want to catch derives from :class:`PymwError`.  A task
that raised in a worker is re-raised in the master as its *original*
exception type whenever that exception can be unpickled; otherwise as
:class:`TaskFailed`.  Either way the worker-side traceback text travels with
it as ``__cause__`` (a :class:`RemoteTraceback`, the same convention as
``concurrent.futures.process``) and the failed :class:`~pymw_magic.task.Task`
is attached as ``exc.pymw_task``.
"""

from __future__ import annotations


class PymwError(Exception):
    """Base class of pymw-magic's own errors."""


class PayloadError(PymwError):
    """A function, argument or result cannot be pickled and sent.

    The message names the offending value (a captured global, an argument
    position) and its type, so it can be fixed without reading a pickle
    traceback.
    """


class TaskFailed(PymwError):
    """A task did not produce a result.

    Raised as such when the task's own exception could not be brought back
    to the master (it was not picklable), and the base of the errors below.
    """


class WorkerLost(TaskFailed):
    """The worker running the task died (killed, crashed, lost) and the
    task's retries are used up."""


class TaskTimeout(TaskFailed):
    """The task ran longer than the ``timeout`` it was given and was stopped."""


class SignatureError(PymwError):
    """A frame's HMAC did not verify: it was not sent by our master (or was
    altered). The frame is discarded before anything is unpickled."""


class RemoteTraceback(Exception):
    """Carries a worker's traceback text as the ``__cause__`` of a re-raised
    task exception, so the notebook shows where the task failed."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class InvalidTransition(PymwError):
    """An internal bug: a task was moved along an edge its state machine
    does not have."""


class ShutDownError(TaskFailed, RuntimeError):
    """The task was still queued when its master was closed for good (its
    workers were stopped, or the master was dropped without ``shutdown()``),
    so it never ran.  A ``RuntimeError`` too, like ``concurrent.futures``'
    refusals after shutdown."""


class PolicyFailed(TaskFailed):
    """The scheduling policy raised when asked for the next task, so the
    queue can no longer be read: every task still queued on that master
    fails with this error (with the policy's own exception as its cause),
    and so does every task submitted there later.  Fix the policy and make
    a new master."""
