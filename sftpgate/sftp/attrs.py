"""How setstat attributes are journaled, whichever front door saw them. Pure."""

from __future__ import annotations

from typing import Any, Protocol


class AttrsLike(Protocol):
    """What :func:`summarize` reads: our :class:`~.packets.Attrs` and asyncssh's ``SFTPAttrs``."""

    @property
    def size(self) -> int | None: ...
    @property
    def permissions(self) -> int | None: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def gid(self) -> int | None: ...
    @property
    def atime(self) -> float | int | None: ...
    @property
    def mtime(self) -> float | int | None: ...


def summarize(attrs: AttrsLike | None) -> dict[str, Any]:
    """The attributes a client asked to set, as the journal's ``attrs`` JSON (None: ``{}``)."""
    out: dict[str, Any] = {}
    if attrs is None:
        return out
    if attrs.size is not None:
        out["size"] = attrs.size
    if attrs.permissions is not None:
        out["mode"] = f"{attrs.permissions & 0o7777:04o}"
    for name in ("uid", "gid", "atime", "mtime"):
        value = getattr(attrs, name)
        if value is not None:
            out[name] = value
    return out
