"""User-facing errors: one line that names the file, column or setting at fault.

Anything raised as a `PipelineError` is printed by the job entrypoints as a single `error: ...` line with a
non-zero exit; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class PipelineError(Exception):
    """A problem with the input, the config or the environment that the user can fix."""


class ConfigError(PipelineError):
    """An invalid config key or value; the message names the dotted key."""


def check_config(cond: bool, key: str, msg: str) -> None:
    """Raise `ConfigError("config <key>: <msg>")` unless `cond`: every config check names its dotted key."""
    if not cond:
        raise ConfigError(f"config {key}: {msg}")


class InputError(PipelineError):
    """Bad input data; the message names the file and column."""


class StorageError(PipelineError):
    """Object storage unreachable, credentials refused, bucket missing."""


class ArtifactError(PipelineError):
    """A model artifact that is missing, foreign, tampered with or incompatible."""


# A PipelineError raised inside a Ray task reaches the driver only as text in the RayTaskError's traceback:
# Ray Data wraps it (`raise UserCodeException(...) from e`) and the chained cause does not survive pickling.
_REMOTE_ERROR = re.compile(r"^pipeline\.errors\.(\w+): (.+)$", re.MULTILINE)


def _walk(exc: BaseException):
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        # RayTaskError keeps the user's exception in `.cause`; Ray Train's WorkerGroupError keeps each
        # worker's in `.worker_failures`; ControllerError in `.controller_failure`.
        for attr in ("cause", "controller_failure", "__cause__", "__context__"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(f for f in failures.values() if isinstance(f, BaseException))
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                stack.append(arg)


def find_pipeline_error(exc: BaseException) -> PipelineError | None:
    """Return the PipelineError at the root of `exc`, looking through Ray's task/actor/train error wrappers."""
    chain = list(_walk(exc))
    for e in chain:
        # A RayTaskError is a subclass of the user's exception class too, but its text is the whole remote
        # traceback: prefer the plain exception it carries.
        cause = getattr(e, "cause", None)
        if isinstance(cause, PipelineError):
            return cause
        if isinstance(e, PipelineError) and not type(e).__module__.startswith("ray"):
            return e
    classes = {c.__name__: c for c in (PipelineError, ConfigError, InputError, StorageError, ArtifactError)}
    for e in chain:
        m = _REMOTE_ERROR.search(str(e))
        if m:
            return classes.get(m.group(1), PipelineError)(m.group(2).strip())
    return None
