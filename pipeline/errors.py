"""User-facing errors: one line that names the file, column or setting at fault.

Anything raised as a `PipelineError` is printed by the job entrypoints as a single `error: ...` line with a
non-zero exit; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the input, the config or the environment that the user can fix."""


class ConfigError(PipelineError):
    """An invalid config key or value; the message names the dotted key."""


class InputError(PipelineError):
    """Bad input data; the message names the file and column."""


class StorageError(PipelineError):
    """Object storage unreachable, credentials refused, bucket missing."""


class ArtifactError(PipelineError):
    """A model artifact that is missing, foreign, tampered with or incompatible."""


def find_pipeline_error(exc: BaseException) -> PipelineError | None:
    """Return the PipelineError at the root of `exc`, looking through Ray's task/actor error wrappers."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PipelineError):
            return e
        # RayTaskError keeps the user's exception in `.cause`; Ray Data's UserCodeException chains it.
        for attr in ("cause", "__cause__", "__context__"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                stack.append(arg)
    return None
