"""Email to uploaders (and the admin): templates, MIME messages, SMTP delivery.

Three layers, each usable on its own:

* :mod:`.templates` renders a kind (``converted``, ``rejected``, ``dead``) to a
  subject, a text body and an HTML body (pure, no I/O beyond reading a site's
  template overrides);
* :mod:`.message` builds the MIME message, with the poster inline;
* :mod:`.smtp` delivers it, retrying transient failures.

Failures are :class:`TransientEmailError` (try again later) or
:class:`PermanentEmailError` (never retry); both are :class:`EmailError`.
"""

from __future__ import annotations

from ..errors import SftpgateError


class EmailError(SftpgateError):
    """An email could not be built or delivered."""


class TransientEmailError(EmailError):
    """Delivery failed for a reason that may go away: refused, timeout, 4xx reply.

    Worth retrying later (the job's own backoff), the message was not accepted.
    """


class PermanentEmailError(EmailError):
    """Delivery can never succeed as configured: 5xx reply, bad recipient, no password.

    Never retry; record it.
    """


__all__ = ["EmailError", "PermanentEmailError", "TransientEmailError"]
