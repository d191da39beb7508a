"""User-facing errors: the CLI prints their message as one line, no traceback."""


class KdaugError(Exception):
    """An input problem the user can fix; the message names the file, field or flag."""


class PropertyNotAvailable(KdaugError):
    """A model was asked for an output or tap it cannot compute."""


class UnsupportedElement(KdaugError):
    """A model was asked about an element it was not trained on."""
