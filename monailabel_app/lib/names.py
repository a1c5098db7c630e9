"""Image ids, label tags, model and strategy names: names, never paths.

A name is what a client may put into a file name the server builds: letters, digits, '.', '_'
and '-', starting with a letter or digit (so never '..', never hidden, never a separator), at most
128 characters. Files built from names must also resolve (symlinks followed) inside their root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from msa.errors import MSAError

from .errors import Forbidden

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"


def check_name(value: object, what: str) -> str:
    """`value` if it is a name, else an MSAError (422) saying what a name may hold."""
    if not isinstance(value, str) or not value:
        raise MSAError(f"{what} is required ({NAME_RULE})")
    if not NAME.fullmatch(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise MSAError(f"{what} {shown!r} is not a name: use {NAME_RULE}; paths are not accepted")
    return value


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """`path` resolved (symlinks followed); Forbidden (403) unless it lies inside `root` resolved."""
    base = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath(path))
    if resolved != base and base not in resolved.parents:
        raise Forbidden(f"{what} resolves outside the studies folder; refused")
    return resolved
