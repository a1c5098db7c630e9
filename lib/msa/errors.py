"""One exception family for user mistakes: mapped once to CLI exit code 2 and once to HTTP 4xx."""


class MSAError(Exception):
    """A problem with the user's input (file, prompt, checkpoint, option), with a one-line message."""


class CheckpointError(MSAError):
    """A checkpoint or adapter file that does not fit the model it is loaded into."""


class PromptError(MSAError):
    """A point, box or ROI that is malformed or lies outside the image."""


class ImageError(MSAError):
    """An image that cannot be read or cannot be segmented (empty, 4D, NaNs, ...)."""
