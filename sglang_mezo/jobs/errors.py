"""What can go wrong with a request to the jobs layer, as a client sees it: one exception class per kind of
answer. :mod:`sglang_mezo.server.errors` maps each class to one HTTP status, in one table."""

from __future__ import annotations

from sglang_mezo.protocol import Failure, FailureKind


class MezoError(Exception):
    """An error the client is told about: ``kind`` names it in the response, the message says what happened."""

    kind = "error"


class InvalidRequest(MezoError, ValueError):
    """The request cannot run as given (bad hyper-parameters, data that does not fit, a step a job does not
    have)."""

    kind = "invalid_request"


class Forbidden(MezoError):
    """The request asks for a file outside the folders the operator allowed at launch (or for file access that
    is off)."""

    kind = "forbidden"


class TooLarge(MezoError):
    """The request body is larger than the server takes."""

    kind = "too_large"


class TooMany(MezoError):
    """The server holds as many of these (queued jobs, open event streams) as it allows; try again later."""

    kind = "too_many"


class NotFound(MezoError):
    """The request names a job this server does not have."""

    kind = "not_found"


class Conflict(MezoError):
    """The server's state does not allow it now: a job is queued or running, the weights are at no committed
    step, a save target exists, a job was cancelled while the request waited for it."""

    kind = "conflict"


class JobFailed(MezoError):
    """A job the request waited for ran and failed (its failure says why)."""

    kind = "job_failed"

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Unavailable(MezoError):
    """What holds the served weights could not do it (re-reading the base checkpoint, writing a saved one,
    restoring after a failure)."""

    kind = "unavailable"


def error_for(failure: Failure, what: str) -> MezoError:
    """The client's view of a restore or save that failed: a conflict when training is latched off until a
    reset, the executor's failure otherwise."""
    cls = Conflict if failure.kind is FailureKind.TRAINING_DISABLED else Unavailable
    return cls(f"{what} failed: {failure.message}")
