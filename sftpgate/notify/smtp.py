"""Deliver a message over SMTP (plain, STARTTLS or implicit TLS), retrying what may pass.

Blocking: callers on the event loop run :func:`send` in a thread.
"""

from __future__ import annotations

import logging
import os
import smtplib
import ssl
from collections.abc import Callable
from email.message import EmailMessage

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from .. import metrics
from ..config import SmtpConfig
from . import EmailError, PermanentEmailError, TransientEmailError

log = logging.getLogger(__name__)


def _connect_plain(cfg: SmtpConfig, context: ssl.SSLContext) -> smtplib.SMTP:
    return smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout)


def _connect_tls(cfg: SmtpConfig, context: ssl.SSLContext) -> smtplib.SMTP:
    return smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout, context=context)


def _greet_plain(client: smtplib.SMTP, context: ssl.SSLContext) -> None:
    client.ehlo()


def _greet_starttls(client: smtplib.SMTP, context: ssl.SSLContext) -> None:
    client.ehlo()
    client.starttls(context=context)
    client.ehlo()  # capabilities change under TLS: servers often offer AUTH only now


# security -> (open the connection and read the greeting, then say EHLO and secure it)
_Connect = Callable[[SmtpConfig, ssl.SSLContext], smtplib.SMTP]
_Greet = Callable[[smtplib.SMTP, ssl.SSLContext], None]
_SECURITY: dict[str, tuple[_Connect, _Greet]] = {
    "none": (_connect_plain, _greet_plain),
    "starttls": (_connect_plain, _greet_starttls),
    "tls": (_connect_tls, _greet_plain),
}


def read_password(cfg: SmtpConfig) -> str | None:
    """The SMTP password, or None when ``cfg.username`` is not set.

    ``password_file`` wins over ``password_env``; one trailing newline is
    stripped from the file. Raises :class:`PermanentEmailError` naming the
    file or variable when it is missing, unreadable or empty, or when neither
    is configured.
    """
    if cfg.username is None:
        return None
    if cfg.password_file is not None:
        try:
            text = cfg.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise PermanentEmailError(
                f"smtp.password_file {cfg.password_file}: cannot read: {why}"
            ) from None
        password = text.removesuffix("\n").removesuffix("\r")
        if not password:
            raise PermanentEmailError(f"smtp.password_file {cfg.password_file}: is empty")
        return password
    if cfg.password_env is not None:
        password = os.environ.get(cfg.password_env, "")
        if not password:
            raise PermanentEmailError(
                f"smtp.password_env: environment variable {cfg.password_env} is not set or empty"
            )
        return password
    raise PermanentEmailError("smtp.username is set but neither password_file nor password_env")


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {text}".strip()


def _classify(exc: BaseException) -> EmailError:
    """Translate one SMTP/socket failure into a Transient or Permanent email error.

    Transient: connection refused/reset/timeout (any OSError, TLS failures
    included), the server hanging up or greeting badly, and 4xx replies.
    Permanent: 5xx (or other unexpected) replies, such as a refused recipient
    or a failed login, and a server lacking what the configuration asks for
    (STARTTLS, AUTH).
    """
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        replies = "; ".join(
            f"{rcpt}: {_reply(code, text)}" for rcpt, (code, text) in exc.recipients.items()
        )
        if all(code >= 500 for code, _ in exc.recipients.values()):
            return PermanentEmailError(f"recipient refused: {replies}")
        return TransientEmailError(f"recipient refused for now: {replies}")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TransientEmailError(f"server disconnected: {exc}")
    if isinstance(exc, smtplib.SMTPConnectError):
        return TransientEmailError(f"bad greeting: {_reply(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        what = {
            smtplib.SMTPAuthenticationError: "login failed",
            smtplib.SMTPSenderRefused: "sender refused",
            smtplib.SMTPDataError: "message refused",
        }.get(type(exc), "server said")
        reply = _reply(exc.smtp_code, exc.smtp_error)
        if 400 <= exc.smtp_code < 500:
            return TransientEmailError(f"{what}: {reply}")
        return PermanentEmailError(f"{what}: {reply}")
    if isinstance(exc, smtplib.SMTPException):
        # STARTTLS or AUTH not offered, no AUTH method in common: the server
        # does not match the configuration, and retrying will not change that.
        return PermanentEmailError(f"{exc}")
    if isinstance(exc, TimeoutError):
        return TransientEmailError("timed out")
    if isinstance(exc, OSError):
        return TransientEmailError(f"{type(exc).__name__}: {exc.strerror or exc}")
    raise TypeError(f"not an SMTP failure: {exc!r}") from exc


def _attempt(
    message: EmailMessage, cfg: SmtpConfig, password: str | None, context: ssl.SSLContext
) -> None:
    where = f"smtp {cfg.host}:{cfg.port}"
    connect, greet = _SECURITY[cfg.security]
    try:
        client = connect(cfg, context)  # closes its socket itself when it fails
    except (smtplib.SMTPException, OSError) as exc:
        raise _with_where(_classify(exc), where) from exc
    try:
        greet(client, context)
        if cfg.username is not None and password is not None:
            client.login(cfg.username, password)
        refused = client.send_message(message)
    except (smtplib.SMTPException, OSError) as exc:
        client.close()
        raise _with_where(_classify(exc), where) from exc
    # The message is accepted from here on: a failed QUIT must not make the
    # caller (or tenacity) send it twice.
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()
    if refused:
        # Delivered to some recipients, refused by others: retrying would send
        # duplicates to the first, so it is final.
        replies = "; ".join(f"{r}: {_reply(c, t)}" for r, (c, t) in refused.items())
        raise PermanentEmailError(f"{where}: some recipients refused: {replies}")


def _with_where(error: EmailError, where: str) -> EmailError:
    return type(error)(f"{where}: {error}")


def send(message: EmailMessage, cfg: SmtpConfig, ssl_context: ssl.SSLContext | None = None) -> None:
    """Deliver ``message`` through the server in ``cfg``; return once it is accepted.

    Connects per ``cfg.security`` (``none``, ``starttls``, ``tls``; TLS
    verifies the server's certificate with ``ssl_context``, by default the
    system's trust store), logs in when ``cfg.username`` is set, and sends to
    the message's To/Cc/Bcc. Transient failures are tried again up to
    ``cfg.retries`` times, waiting ``cfg.retry_wait * 2**n`` seconds.

    Raises :class:`TransientEmailError` when the last try failed for a reason
    that may pass (refused, timeout, 4xx): the message was not accepted, retry
    later. Raises :class:`PermanentEmailError` at once, without retrying, for a
    5xx reply, a failed login or a missing password. Never raises anything
    else for SMTP or socket failures.
    """
    try:
        _deliver(message, cfg, ssl_context)
    except TransientEmailError:
        metrics.record_email("transient_failure")
        raise
    except PermanentEmailError:
        metrics.record_email("permanent_failure")
        raise
    metrics.record_email("sent")


def _deliver(message: EmailMessage, cfg: SmtpConfig, ssl_context: ssl.SSLContext | None) -> None:
    if cfg.security not in _SECURITY:
        raise PermanentEmailError(
            f"smtp.security: {cfg.security!r} is not one of {', '.join(_SECURITY)}"
        )
    password = read_password(cfg)
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    attempts = cfg.retries + 1
    retrying = Retrying(
        retry=retry_if_exception_type(TransientEmailError),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=cfg.retry_wait),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    try:
        retrying(_attempt, message, cfg, password, context)
    except TransientEmailError as exc:
        raise TransientEmailError(f"{exc} (gave up after {attempts} attempts)") from exc
