"""Build the MIME message: text + HTML alternatives, the poster inline."""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from .templates import POSTER_MARKER, Rendered


@dataclass(frozen=True, slots=True)
class Poster:
    """The JPEG to show inline: its file name (for the part) and its bytes.

    The caller reads it (the pipeline does, as the uploader, through the
    output folder's descriptor); building a message opens no file.
    """

    name: str
    data: bytes


def _domain(address: str) -> str | None:
    # make_msgid() would otherwise call socket.getfqdn(), which can stall on DNS.
    _, at, domain = address.rpartition("@")
    domain = domain.strip("<> ")
    return domain if at and domain else None


def header_safe(text: str) -> str:
    """``text`` fit for a header parameter: every control character and line break a space.

    A file name may hold CR, LF or anything else an uploader chose; the email
    package refuses a header with a line break (and would be right to: it
    could start a header of its own). Non-ASCII is fine: the email package
    encodes it (RFC 2231 for parameters, RFC 2047 for words).
    """
    return "".join(" " if unicodedata.category(c) in _UNSAFE or c in _BREAKS else c for c in text)


_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_BREAKS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def _poster_html(html_body: str, cid: str, alt: str) -> str:
    img = f'<p><img src="cid:{cid[1:-1]}" alt="{html.escape(alt)}" style="max-width: 100%"></p>'
    if POSTER_MARKER in html_body:
        return html_body.replace(POSTER_MARKER, img, 1)
    # A site template without $poster still shows the image: before </body>.
    index = html_body.lower().rfind("</body>")
    if index < 0:
        return html_body + "\n" + img
    return html_body[:index] + img + "\n" + html_body[index:]


def build_message(
    rendered: Rendered, *, sender: str, recipient: str, poster: Poster | None = None
) -> EmailMessage:
    """A ready-to-send message (``email.policy.SMTP``: CRLF line ends).

    Promises: ``multipart/alternative`` with a text part and an HTML part;
    with ``poster``, the HTML part is ``multipart/related`` holding the JPEG
    inline and the HTML shows it through ``cid:`` (where the template has
    ``$poster``, else just before ``</body>``); without it, the poster marker
    is removed. Date, Message-ID and ``Auto-Submitted: auto-generated`` (so
    vacation responders stay quiet) are set.

    The poster's file name (the uploader's choice) goes into its part's
    header through :func:`header_safe`, so no upload name can stop the email.

    Raises :class:`ValueError` when ``sender``, ``recipient`` or the subject
    cannot be a header (e.g. contain a line break).
    """
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = rendered.subject
    msg["Date"] = formatdate(localtime=True)
    domain = _domain(sender)
    msg["Message-ID"] = make_msgid("sftpgate", domain=domain)
    msg["Auto-Submitted"] = "auto-generated"

    msg.set_content(rendered.text)
    if poster is None:
        msg.add_alternative(rendered.html.replace(POSTER_MARKER, ""), subtype="html")
        return msg

    cid = make_msgid("poster", domain=domain)
    msg.add_alternative(_poster_html(rendered.html, cid, alt=poster.name), subtype="html")
    html_part = msg.get_body(preferencelist=("html",))
    assert html_part is not None
    html_part.add_related(
        poster.data,
        maintype="image",
        subtype="jpeg",
        cid=cid,
        disposition="inline",
        filename=header_safe(poster.name),
    )
    return msg
