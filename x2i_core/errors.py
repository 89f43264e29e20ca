"""One exception family for the whole library.

Every message names the input, what was expected and what was found, so a
user can act on it without reading a traceback.
"""


class X2IError(Exception):
    """Base class of every error raised on purpose by x2i_core."""


class X2IFileError(X2IError):
    """A model file is missing, unreadable, corrupt or of the wrong kind."""


class X2IUnsafeFileError(X2IFileError):
    """A file would need arbitrary code execution (pickle) to load."""


class X2IShapeError(X2IError):
    """Dimensions of two parts (MLLM, AlignNet, FLUX) do not fit together."""


class X2IInputError(X2IError, ValueError):
    """A prompt, image, video or option given by the user is unusable."""
