"""Email templates: built-in defaults, per-site overrides, safe rendering.

Placeholders use :class:`string.Template` syntax (``$name`` or ``${name}``):

=============== ==========================================================
``$name``       the user's first name (all kinds)
``$surname``    the user's surname (all kinds)
``$login``      the user's login (all kinds)
``$file``       the uploaded file as the user sees it, e.g. ``/in/clip.mp4``
``$duration``   ``h:mm:ss`` (``converted``; see :func:`format_duration`)
``$resolution`` ``WxH`` (``converted``)
``$outputs``    list of output paths as the user sees them over SFTP, e.g.
                ``/converted/clip.flv`` (``converted``; see :func:`sftp_path`)
``$reason``     why the upload was not converted (``rejected``, ``refused``),
                or the job's last error (``dead``)
``$job_id``     the job (all kinds; ``dead`` always shows it)
``$items``      one line per upload told of (``digest``), e.g.
                ``/a.mp4: converted: /converted/a.flv``
``$count``      how many uploads a ``digest`` tells of
``$subject``    the rendered subject (text and HTML bodies; set by
                :func:`render`)
``$poster``     where the inline poster goes in the HTML body (set by
                :func:`render`)
=============== ==========================================================

A site overrides any part of a kind by putting ``<kind>.subject``,
``<kind>.txt`` or ``<kind>.html`` (UTF-8) in ``email.templates_dir``; parts
without a file keep the built-in text.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from string import Template

from . import PermanentEmailError

# Stands where the poster goes in a rendered HTML body; build_message() swaps it
# for the <img>. HTML-escaped values can never contain "<", so no uploaded file
# name can forge it.
POSTER_MARKER = "<!--sftpgate:poster-->"

Context = Mapping[str, str | list[str]]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered email: one-line subject, plain-text body, HTML body."""

    subject: str
    text: str
    html: str


_HTML_HEAD = """\
<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>$subject</title></head>
<body style="font-family: sans-serif; line-height: 1.4">
"""
_HTML_FOOT = """\
<p style="color: #777; font-size: smaller">This message was sent automatically;
replies are not read.</p>
</body>
</html>
"""

_FOOTER = "\n-- \nThis message was sent automatically; replies are not read.\n"

BUILTIN: dict[str, Rendered] = {
    "converted": Rendered(
        subject="Your video $file is ready",
        text=(
            "Hello $name $surname,\n"
            "\n"
            "your video $file has been converted.\n"
            "\n"
            "Duration:   $duration\n"
            "Resolution: $resolution\n"
            "\n"
            "Log in as $login over SFTP to download:\n"
            "\n"
            "$outputs\n" + _FOOTER
        ),
        html=(
            _HTML_HEAD + "<p>Hello $name $surname,</p>\n"
            "<p>your video <b>$file</b> has been converted.</p>\n"
            "$poster\n"
            "<table>\n"
            "<tr><td>Duration</td><td>$duration</td></tr>\n"
            "<tr><td>Resolution</td><td>$resolution</td></tr>\n"
            "</table>\n"
            "<p>Log in as <b>$login</b> over SFTP to download:</p>\n"
            "$outputs\n" + _HTML_FOOT
        ),
    ),
    "rejected": Rendered(
        subject="Your upload $file was not converted",
        text=(
            "Hello $name $surname,\n"
            "\n"
            "your upload $file was not converted:\n"
            "\n"
            "    $reason\n"
            "\n"
            "Only video files can be converted. The file itself is untouched.\n" + _FOOTER
        ),
        html=(
            _HTML_HEAD + "<p>Hello $name $surname,</p>\n"
            "<p>your upload <b>$file</b> was not converted:</p>\n"
            "<blockquote>$reason</blockquote>\n"
            "<p>Only video files can be converted. The file itself is untouched.</p>\n" + _HTML_FOOT
        ),
    ),
    "refused": Rendered(
        subject="Your upload $file was not converted: too many uploads waiting",
        text=(
            "Hello $name $surname,\n"
            "\n"
            "your upload $file was not converted:\n"
            "\n"
            "    $reason\n"
            "\n"
            "Further uploads are refused the same way until your waiting uploads\n"
            "are done; this is the only message about them. The files themselves\n"
            "are untouched.\n" + _FOOTER
        ),
        html=(
            _HTML_HEAD + "<p>Hello $name $surname,</p>\n"
            "<p>your upload <b>$file</b> was not converted:</p>\n"
            "<blockquote>$reason</blockquote>\n"
            "<p>Further uploads are refused the same way until your waiting uploads are "
            "done; this is the only message about them. The files themselves are "
            "untouched.</p>\n" + _HTML_FOOT
        ),
    ),
    "digest": Rendered(
        subject="Your uploads: $count updates",
        text=(
            "Hello $name $surname,\n"
            "\n"
            "you uploaded more than we send single messages about, so here is\n"
            "what became of the rest:\n"
            "\n"
            "$items\n"
            "\n"
            "Log in as $login over SFTP to download what was converted.\n" + _FOOTER
        ),
        html=(
            _HTML_HEAD + "<p>Hello $name $surname,</p>\n"
            "<p>you uploaded more than we send single messages about, so here is what "
            "became of the rest:</p>\n"
            "$items\n"
            "<p>Log in as <b>$login</b> over SFTP to download what was converted.</p>\n"
            + _HTML_FOOT
        ),
    ),
    "dead": Rendered(
        subject="sftpgate: job $job_id failed for good ($login: $file)",
        text=(
            "Job $job_id has used all its attempts and is now dead.\n"
            "\n"
            "User:  $login ($name $surname)\n"
            "File:  $file\n"
            "\n"
            "Last error:\n"
            "\n"
            "$reason\n" + _FOOTER
        ),
        html=(
            _HTML_HEAD + "<p>Job <b>$job_id</b> has used all its attempts and is now dead.</p>\n"
            "<table>\n"
            "<tr><td>User</td><td>$login ($name $surname)</td></tr>\n"
            "<tr><td>File</td><td>$file</td></tr>\n"
            "</table>\n"
            "<p>Last error:</p>\n"
            "<pre>$reason</pre>\n" + _HTML_FOOT
        ),
    ),
}

KINDS = tuple(BUILTIN)

_SUFFIXES = {"subject": ".subject", "text": ".txt", "html": ".html"}


def format_duration(seconds: float) -> str:
    """``3725.4`` → ``"1:02:05"`` (rounded to whole seconds; hours are not capped)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def sftp_path(home: Path, path: Path) -> str:
    """The path a user sees over SFTP for ``path`` inside ``home``: ``/converted/clip.flv``.

    Raises :class:`ValueError` when ``path`` is not inside ``home``.
    """
    return str(PurePosixPath("/") / path.relative_to(home).as_posix())


def _one_line(text: str) -> str:
    # str.split() breaks on every line boundary Python knows (\r, \n, \x0b,
    # \x0c, \x1c-\x1e, \x85, \u2028, \u2029), so nothing can start a new header.
    return " ".join(text.split())


def _text_value(value: str | list[str]) -> str:
    return "\n".join(value) if isinstance(value, list) else value


def _subject_value(value: str | list[str]) -> str:
    return ", ".join(value) if isinstance(value, list) else value


def _html_value(value: str | list[str]) -> str:
    if isinstance(value, list):
        if not value:
            return ""
        items = "".join(f"<li>{html.escape(item)}</li>\n" for item in value)
        return f"<ul>\n{items}</ul>"
    return html.escape(value)


_FORMATTERS: dict[str, Callable[[str | list[str]], str]] = {
    "subject": _subject_value,
    "text": _text_value,
    "html": _html_value,
}


def _read_override(templates_dir: Path, kind: str, part: str) -> str | None:
    path = templates_dir / f"{kind}{_SUFFIXES[part]}"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PermanentEmailError(f"{path}: cannot read template: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PermanentEmailError(
            f"{path}: template is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None


def _substitute(template: str, context: Context, part: str, extra: dict[str, str]) -> str:
    format_value = _FORMATTERS[part]
    values = {key: format_value(value) for key, value in context.items()}
    values.update(extra)
    # safe_substitute: a typo in a site's template stays visible in the email
    # instead of failing the job.
    return Template(template).safe_substitute(values)


def render(kind: str, context: Context, templates_dir: Path | None = None) -> Rendered:
    """Render the email of ``kind`` with ``context`` (see the module docstring).

    Promises: the subject is one line (every CR, LF and other line break in
    templates or values becomes a space); every value in the HTML body is
    HTML-escaped; a list value becomes one line per item in the text and a
    ``<ul>`` in the HTML; unknown placeholders are left as written. The HTML
    body carries :data:`POSTER_MARKER` where ``$poster`` stands.

    Raises :class:`ValueError` for an unknown kind, and
    :class:`~sftpgate.notify.PermanentEmailError` when an override file exists
    but cannot be read or is not UTF-8.
    """
    if kind not in BUILTIN:
        raise ValueError(f"unknown email kind {kind!r} (known: {', '.join(KINDS)})")
    builtin = BUILTIN[kind]
    parts = {"subject": builtin.subject, "text": builtin.text, "html": builtin.html}
    if templates_dir is not None:
        for part in parts:
            override = _read_override(templates_dir, kind, part)
            if override is not None:
                parts[part] = override
    subject = _one_line(_substitute(parts["subject"], context, "subject", {"poster": ""}))
    text = _substitute(parts["text"], context, "text", {"poster": "", "subject": subject})
    body = _substitute(
        parts["html"],
        context,
        "html",
        {"poster": POSTER_MARKER, "subject": html.escape(subject)},
    )
    return Rendered(subject=subject, text=text, html=body)
