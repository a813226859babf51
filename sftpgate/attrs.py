"""How setstat attributes are journaled, whichever front door saw them. Pure."""

from __future__ import annotations

from typing import Any


def summarize(
    *,
    size: int | None,
    permissions: int | None,
    uid: int | None,
    gid: int | None,
    atime: float | None,
    mtime: float | None,
) -> dict[str, Any]:
    """The attributes a client asked to set, as the journal's ``attrs`` JSON."""
    out: dict[str, Any] = {}
    if size is not None:
        out["size"] = size
    if permissions is not None:
        out["mode"] = f"{permissions & 0o7777:04o}"
    for name, value in (("uid", uid), ("gid", gid), ("atime", atime), ("mtime", mtime)):
        if value is not None:
            out[name] = value
    return out
