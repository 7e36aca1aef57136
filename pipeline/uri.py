"""URI helpers: the scheme of a URI, an absolute local path, joined paths. Pure strings, no I/O, no imports
from the rest of the pipeline: every layer may use them."""

from __future__ import annotations

import re
from pathlib import Path

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def normalize_uri(uri: str) -> str:
    """Absolute local paths; URIs unchanged except for a trailing slash."""
    if scheme_of(uri) == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return str(Path(path).expanduser().resolve())
    return uri.rstrip("/")


def strip_scheme(uri: str) -> str:
    """The path part of a URI (`bucket/key` of `s3://bucket/key`)."""
    return _SCHEME.sub("", uri)


def join_uri(base: str, *parts: str) -> str:
    """`base/part/part`, with exactly one slash between the pieces."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out
