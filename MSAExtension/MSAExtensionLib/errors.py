"""The one exception type the extension shows to a user."""

from __future__ import annotations


class MSAClientError(Exception):
    """A request to the MSA server that did not give a usable answer, in words a user can act on.

    Raised for: server down or unreachable, a wrong URL (not a MONAI Label server), a server without
    an MSA model, any 4xx/5xx answer (its `detail` is quoted), an answer that cannot be read, and
    prompts that cannot be sent (a point outside the volume, an ROI that misses it). The panel and
    the effect show `str(error)` on their status line; nothing else is raised for those cases.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status when the server answered, else None


class ImageLost(MSAClientError):
    """The server answered 404 for an image this client had uploaded, and a look-up confirms it is gone
    (a restart with another studies folder at the same URL, the image deleted). The client has
    forgotten the id: preparing the request again copies the voxels, and sending it uploads them."""
