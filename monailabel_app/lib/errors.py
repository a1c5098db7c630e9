"""The app's user-facing errors: msa.errors.MSAError subclasses, and the one table that maps them
(and the few exceptions MONAI Label raises for a client's mistake) to an HTTP status.

Code anywhere in the app raises one of these with a one-line message; the request guard
(lib/guard.py) answers it with `{"detail": message}` and that status, and logs it once.
"""

from __future__ import annotations

from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)

from msa.errors import MSAError


class BadRequest(MSAError):
    """A malformed request line or header (query string that does not decode, Host not served)."""


class Forbidden(MSAError):
    """Refused by policy: a browser origin nobody allowed, a path that resolves outside the studies folder."""


class NotFound(MSAError):
    """An image, label, model, strategy or route this server does not have."""


class MethodNotAllowed(MSAError):
    """A route this server has, with a method it refuses (model uploads, for instance)."""


class Busy(MSAError):
    """A task of that kind already runs (MONAI Label answers 429 for it: kept for its clients)."""


class PayloadTooLarge(MSAError):
    """A request body over the route's limit."""


class UnsupportedFile(MSAError):
    """An upload that is not a file type the server stores, or not multipart/form-data."""


class Unavailable(MSAError):
    """The server cannot answer now (an inference that ran past MONAI_LABEL_INFER_TIMEOUT)."""


# First match in this order wins; MSAError itself (prompts, params, images that fail a check) is 422.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (BadRequest, 400),
    (Forbidden, 403),
    (NotFound, 404),
    (ImageNotFoundException, 404),
    (LabelNotFoundException, 404),
    (MethodNotAllowed, 405),
    (Busy, 429),
    (PayloadTooLarge, 413),
    (UnsupportedFile, 415),
    (Unavailable, 503),
    (MSAError, 422),
)


def status_of(error: BaseException) -> int | None:
    """The HTTP status a client mistake maps to; None for anything else (a server fault: 500)."""
    for kind, status in STATUS:
        if isinstance(error, kind):
            return status
    if isinstance(error, MONAILabelException) and error.error == MONAILabelError.INVALID_INPUT:
        return 422  # MONAI Label's own word for a client mistake; its other kinds are server faults
    return None


def message_of(error: BaseException) -> str:
    """One line; MONAI Label's exceptions keep their message in `.msg`."""
    text = getattr(error, "msg", None) if isinstance(error, MONAILabelException) else None
    text = str(text or error or type(error).__name__)
    return " ".join(text.split())[:2000]
