"""Email: templates and messages (pure), delivery against real aiosmtpd servers.

Each server test starts its own aiosmtpd Controller on a free loopback port and
stops it afterwards. TLS tests use a throwaway self-signed certificate that
only the test's client context trusts.
"""

from __future__ import annotations

import datetime
import email
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sftpgate.config import SmtpConfig
from sftpgate.notify import PermanentEmailError, TransientEmailError
from sftpgate.notify.message import Poster, build_message
from sftpgate.notify.smtp import read_password, send
from sftpgate.notify.templates import POSTER_MARKER, format_duration, render, sftp_path

SENDER = "sftpgate@gw.example.org"
RECIPIENT = "alice@example.org"
POSTER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00fake-jpeg\xff\xd9"


# --- helpers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def converted_context(file: str = "/in/clip.mp4") -> dict[str, str | list[str]]:
    return {
        "name": "Alice",
        "surname": "Liddell",
        "login": "alice",
        "file": file,
        "duration": format_duration(3725),
        "resolution": "1280x720",
        "outputs": ["/converted/clip.flv", "/converted/clip.json"],
        "job_id": "42",
    }


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def body(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body(preferencelist=(subtype,))
    assert part is not None, f"no text/{subtype} part"
    content = part.get_content()
    assert isinstance(content, str)
    return content


@dataclass
class Delivery:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool


@dataclass
class Recorder:
    """aiosmtpd handler that accepts everything and keeps what arrived."""

    deliveries: list[Delivery] = field(default_factory=list)
    rcpt_calls: int = 0
    data_calls: int = 0

    def rcpt_reply(self) -> str | None:
        return None  # None: accept

    def data_reply(self) -> str | None:
        return None

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpt_calls += 1
        reply = self.rcpt_reply()
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_calls += 1
        reply = self.data_reply()
        if reply is not None:
            return reply
        assert envelope.mail_from is not None
        assert isinstance(envelope.content, bytes)
        assert server.transport is not None
        self.deliveries.append(
            Delivery(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                message=parse(envelope.content),
                tls=server.transport.get_extra_info("ssl_object") is not None,
            )
        )
        return "250 Message accepted for delivery"


@dataclass
class TryLater(Recorder):
    """Answers ``451`` the first ``times`` times at ``stage``, then accepts."""

    times: int = 2
    stage: str = "DATA"

    def _next(self, stage: str) -> str | None:
        if stage == self.stage and self.times > 0:
            self.times -= 1
            return "451 4.3.0 try later"
        return None

    def rcpt_reply(self) -> str | None:
        return self._next("RCPT")

    def data_reply(self) -> str | None:
        return self._next("DATA")


@dataclass
class NoSuchUser(Recorder):
    """Answers ``550`` at ``stage``, every time."""

    stage: str = "RCPT"

    def rcpt_reply(self) -> str | None:
        return "550 5.1.1 no such user" if self.stage == "RCPT" else None

    def data_reply(self) -> str | None:
        return "550 5.1.1 no such user" if self.stage == "DATA" else None


@dataclass
class Authenticator:
    """aiosmtpd ``authenticator=``: accepts one login/password, records every try."""

    login: str
    password: str
    tries: list[tuple[str, str, str]] = field(default_factory=list)

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.tries.append((mechanism, login, password))
        ok = (login, password) == (self.login, self.password)
        # handled=False: aiosmtpd answers 535 itself (True would leave the client hanging)
        return AuthResult(success=ok, handled=False)


StartServer = Callable[..., SmtpConfig]


@pytest.fixture
def smtp_server() -> Iterator[StartServer]:
    """Start an aiosmtpd server with a handler and Controller options; get a config for it."""
    controllers: list[Controller] = []

    def start(handler: Recorder, *, security: str = "none", **options: Any) -> SmtpConfig:
        port = free_port()
        controller = Controller(
            handler, hostname="127.0.0.1", port=port, server_hostname="localhost", **options
        )
        controller.start()
        controllers.append(controller)
        return SmtpConfig(
            host="127.0.0.1",
            port=port,
            security=security,
            sender=SENDER,
            timeout=5.0,
            retries=3,
            retry_wait=0.0,
        )

    yield start
    for controller in controllers:
        controller.stop()


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sftpgate test smtp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_path, key_path)


@pytest.fixture
def poster(tmp_path: Path) -> Path:
    path = tmp_path / "clip.jpg"
    path.write_bytes(POSTER)
    return path


def with_(cfg: SmtpConfig, **changes: Any) -> SmtpConfig:
    fields = {name: getattr(cfg, name) for name in SmtpConfig.__slots__}
    fields.update(changes)
    return SmtpConfig(**fields)


def converted_message(file: str = "/in/clip.mp4", poster: Path | None = None) -> EmailMessage:
    image = Poster(poster.name, poster.read_bytes()) if poster is not None else None
    rendered = render("converted", converted_context(file), None)
    return build_message(rendered, sender=SENDER, recipient=RECIPIENT, poster=image)


# --- templates and messages (no sockets) ------------------------------------------


def test_duration_and_sftp_paths_are_formatted_for_people(tmp_path: Path) -> None:
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(30 * 3600) == "30:00:00"
    assert sftp_path(tmp_path, tmp_path / "converted" / "clip.flv") == "/converted/clip.flv"
    with pytest.raises(ValueError):
        sftp_path(tmp_path / "home", tmp_path / "elsewhere" / "x.flv")


def test_converted_outputs_are_lines_in_text_and_a_list_in_html() -> None:
    rendered = render("converted", converted_context(), None)
    assert "/in/clip.mp4" in rendered.subject
    assert "\n/converted/clip.flv\n/converted/clip.json\n" in rendered.text
    assert "1:02:05" in rendered.text and "1280x720" in rendered.text
    assert "<ul>\n<li>/converted/clip.flv</li>\n<li>/converted/clip.json</li>\n</ul>" in (
        rendered.html
    )
    assert POSTER_MARKER in rendered.html


def test_html_body_escapes_markup_in_file_names() -> None:
    ctx = converted_context("/in/<b>evil</b>.mp4")
    ctx["outputs"] = ["/converted/<script>.flv"]
    rendered = render("converted", ctx, None)
    assert "&lt;b&gt;evil&lt;/b&gt;.mp4" in rendered.html
    assert "<b>evil</b>" not in rendered.html
    assert "<li>/converted/&lt;script&gt;.flv</li>" in rendered.html
    assert "<script>" not in rendered.html
    # the text body is not HTML: the name stays as the user wrote it
    assert "/in/<b>evil</b>.mp4" in rendered.text


def test_rejected_email_states_the_reason() -> None:
    ctx = converted_context("/in/notes.mp4")
    ctx["reason"] = "not a video: format <text> is not allowed"
    rendered = render("rejected", ctx, None)
    assert "/in/notes.mp4" in rendered.subject
    assert "not a video: format <text> is not allowed" in rendered.text
    assert "not a video: format &lt;text&gt; is not allowed" in rendered.html


def test_dead_job_email_names_job_user_file_and_last_error() -> None:
    ctx = converted_context("/in/clip.mp4")
    ctx["reason"] = "ffmpeg exited with status 1:\nInvalid data found"
    rendered = render("dead", ctx, None)
    assert "42" in rendered.subject and "alice" in rendered.subject
    for part in (rendered.text, rendered.html):
        assert "42" in part and "alice" in part and "/in/clip.mp4" in part
        assert "Invalid data found" in part


def test_line_breaks_in_subject_values_become_spaces() -> None:
    name = "/in/a.mp4\r\nBcc: victim@example.com\u2028X-Evil: 1"
    rendered = render("converted", converted_context(name), None)
    assert rendered.subject == ("Your video /in/a.mp4 Bcc: victim@example.com X-Evil: 1 is ready")


def test_templates_dir_overrides_each_part_and_keeps_unknown_placeholders(
    tmp_path: Path,
) -> None:
    (tmp_path / "converted.subject").write_text("[Video desk] $file for $login\n")
    (tmp_path / "converted.txt").write_text("Dear $name,\n$outputs\nRef: $ticket\n")
    rendered = render("converted", converted_context(), tmp_path)
    assert rendered.subject == "[Video desk] /in/clip.mp4 for alice"
    assert rendered.text == (
        "Dear Alice,\n/converted/clip.flv\n/converted/clip.json\nRef: $ticket\n"
    )
    # no converted.html: the built-in HTML body is used, titled with the new subject
    assert "<b>/in/clip.mp4</b> has been converted" in rendered.html
    assert "<title>[Video desk] /in/clip.mp4 for alice</title>" in rendered.html
    # other kinds are untouched
    assert render("rejected", {"file": "x"}, tmp_path) == render("rejected", {"file": "x"}, None)


def test_unreadable_site_template_is_a_permanent_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "rejected.html").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(PermanentEmailError, match=r"rejected\.html: template is not UTF-8"):
        render("rejected", {}, tmp_path)
    with pytest.raises(ValueError, match="unknown email kind"):
        render("bogus", {}, None)


def test_message_without_poster_is_text_and_html_alternatives() -> None:
    msg = converted_message()
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert POSTER_MARKER not in body(msg, "html")
    assert "<img" not in body(msg, "html")
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"].endswith("@gw.example.org>")
    assert msg["Date"]


def test_poster_goes_before_body_end_when_site_template_has_no_placeholder(
    tmp_path: Path, poster: Path
) -> None:
    (tmp_path / "converted.html").write_text("<html><body><p>$file</p></body></html>")
    rendered = render("converted", converted_context(), tmp_path)
    image = Poster(poster.name, poster.read_bytes())
    msg = build_message(rendered, sender=SENDER, recipient=RECIPIENT, poster=image)
    html = body(msg, "html")
    assert html.index("<p>/in/clip.mp4</p>") < html.index('<img src="cid:') < html.index("</body>")


# --- delivery -------------------------------------------------------------------


def test_converted_email_arrives_once_with_text_html_and_inline_poster(
    smtp_server: StartServer, poster: Path
) -> None:
    handler = Recorder()
    cfg = smtp_server(handler)
    send(converted_message(poster=poster), cfg)

    assert len(handler.deliveries) == 1
    got = handler.deliveries[0]
    assert got.mail_from == SENDER and got.rcpt_tos == [RECIPIENT]
    msg = got.message
    assert msg["From"] == SENDER and msg["To"] == RECIPIENT
    assert msg["Subject"] == "Your video /in/clip.mp4 is ready"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "Hello Alice Liddell" in body(msg, "plain")
    html = body(msg, "html")
    assert "Hello Alice Liddell" in html

    related = msg.get_body(preferencelist=("related",))
    assert related is not None
    image = next(p for p in related.iter_parts() if p.get_content_type() == "image/jpeg")
    assert image.get_content() == POSTER
    assert image.get_content_disposition() == "inline"
    cid = image["Content-ID"]
    assert cid.startswith("<") and cid.endswith(">")
    assert f'<img src="cid:{cid[1:-1]}"' in html


def test_rejected_email_is_delivered_with_the_reason(smtp_server: StartServer) -> None:
    handler = Recorder()
    cfg = smtp_server(handler)
    ctx = converted_context("/in/report.pdf")
    ctx["reason"] = "not a video (pdf)"
    rendered = render("rejected", ctx, None)
    send(build_message(rendered, sender=SENDER, recipient=RECIPIENT, poster=None), cfg)
    (got,) = handler.deliveries
    assert "/in/report.pdf" in got.message["Subject"]
    assert "not a video (pdf)" in body(got.message, "plain")
    assert "not a video (pdf)" in body(got.message, "html")


def test_newline_in_file_name_cannot_inject_a_header(smtp_server: StartServer) -> None:
    handler = Recorder()
    cfg = smtp_server(handler)
    send(converted_message("/in/a.mp4\r\nBcc: victim@example.com\nX-Evil: 1"), cfg)
    (got,) = handler.deliveries
    assert got.rcpt_tos == [RECIPIENT]
    assert got.message["Bcc"] is None and got.message["X-Evil"] is None
    assert got.message["Subject"] == (
        "Your video /in/a.mp4 Bcc: victim@example.com X-Evil: 1 is ready"
    )


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_try_later_twice_then_accepted_is_delivered_exactly_once(
    smtp_server: StartServer, stage: str
) -> None:
    handler = TryLater(times=2, stage=stage)
    cfg = smtp_server(handler)
    send(converted_message(), cfg)  # retries=3, retry_wait=0
    assert len(handler.deliveries) == 1
    assert (handler.rcpt_calls if stage == "RCPT" else handler.data_calls) == 3


def test_try_later_beyond_retries_is_transient(smtp_server: StartServer) -> None:
    handler = TryLater(times=10, stage="DATA")
    cfg = with_(smtp_server(handler), retries=2)
    with pytest.raises(TransientEmailError, match=r"451 4\.3\.0 try later.*after 3 attempts"):
        send(converted_message(), cfg)
    assert handler.data_calls == 3
    assert handler.deliveries == []


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_no_such_user_is_permanent_after_one_attempt(smtp_server: StartServer, stage: str) -> None:
    handler = NoSuchUser(stage=stage)
    cfg = smtp_server(handler)
    with pytest.raises(PermanentEmailError, match=r"550 5\.1\.1 no such user"):
        send(converted_message(), cfg)
    assert handler.rcpt_calls == 1
    assert handler.data_calls == (1 if stage == "DATA" else 0)
    assert handler.deliveries == []


def test_nothing_listening_is_transient_after_all_retries() -> None:
    port = free_port()  # bound and released: nobody listens there
    cfg = SmtpConfig(host="127.0.0.1", port=port, sender=SENDER, retries=2, retry_wait=0.0)
    with pytest.raises(TransientEmailError) as caught:
        send(converted_message(), cfg)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "ConnectionRefusedError" in message
    assert "after 3 attempts" in message


def test_starttls_with_login_delivers_over_tls(
    smtp_server: StartServer, certificate: Certificate, tmp_path: Path
) -> None:
    # aiosmtpd offers AUTH only after STARTTLS here (auth_require_tls defaults
    # to True), so this also proves the client says EHLO again under TLS.
    handler = Recorder()
    auth = Authenticator("mailer", "s3cret")
    password_file = tmp_path / "smtp.password"
    password_file.write_text("s3cret\n")
    cfg = smtp_server(
        handler,
        security="starttls",
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=auth,
    )
    cfg = with_(cfg, username="mailer", password_file=password_file)
    send(converted_message(), cfg, ssl_context=certificate.client_context())
    (got,) = handler.deliveries
    assert got.tls
    assert got.rcpt_tos == [RECIPIENT]
    assert [(login, pw) for _, login, pw in auth.tries] == [("mailer", "s3cret")]


def test_plain_client_is_refused_by_a_server_requiring_starttls(
    smtp_server: StartServer, certificate: Certificate
) -> None:
    handler = Recorder()
    cfg = smtp_server(handler, tls_context=certificate.server_context(), require_starttls=True)
    with pytest.raises(PermanentEmailError, match="530"):
        send(converted_message(), cfg)
    assert handler.deliveries == []


def test_implicit_tls_delivers(smtp_server: StartServer, certificate: Certificate) -> None:
    handler = Recorder()
    cfg = smtp_server(handler, security="tls", ssl_context=certificate.server_context())
    send(converted_message(), cfg, ssl_context=certificate.client_context())
    (got,) = handler.deliveries
    assert got.tls


def test_untrusted_certificate_is_transient_and_sends_nothing(
    smtp_server: StartServer, certificate: Certificate
) -> None:
    # The default context (system trust store) does not know the test's CA; a
    # certificate problem may be fixed on the server, so the job retries later.
    handler = Recorder()
    cfg = smtp_server(handler, security="tls", ssl_context=certificate.server_context())
    with pytest.raises(TransientEmailError, match="CERTIFICATE_VERIFY_FAILED"):
        send(converted_message(), with_(cfg, retries=0))
    assert handler.deliveries == []


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_login_with_password_from_file(
    smtp_server: StartServer, tmp_path: Path, mechanism: str
) -> None:
    handler = Recorder()
    auth = Authenticator("mailer", "pa ss\tword")
    other = "PLAIN" if mechanism == "LOGIN" else "LOGIN"
    cfg = smtp_server(
        handler,
        authenticator=auth,
        auth_require_tls=False,  # plain port in a test; production uses TLS
        auth_exclude_mechanism=[other],
    )
    password_file = tmp_path / "smtp.password"
    password_file.write_text("pa ss\tword\n")
    send(converted_message(), with_(cfg, username="mailer", password_file=password_file))
    assert auth.tries == [(mechanism, "mailer", "pa ss\tword")]
    assert len(handler.deliveries) == 1


def test_login_with_password_from_environment(
    smtp_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = Recorder()
    auth = Authenticator("mailer", "from-env")
    cfg = smtp_server(handler, authenticator=auth, auth_require_tls=False)
    monkeypatch.setenv("SFTPGATE_TEST_SMTP_PASSWORD", "from-env")
    send(
        converted_message(),
        with_(cfg, username="mailer", password_env="SFTPGATE_TEST_SMTP_PASSWORD"),
    )
    assert [(login, pw) for _, login, pw in auth.tries] == [("mailer", "from-env")]
    assert len(handler.deliveries) == 1


def test_wrong_password_is_permanent_without_retry(
    smtp_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = Recorder()
    auth = Authenticator("mailer", "right")
    # One mechanism only: smtplib would otherwise try the next one on 535.
    cfg = smtp_server(
        handler, authenticator=auth, auth_require_tls=False, auth_exclude_mechanism=["LOGIN"]
    )
    monkeypatch.setenv("SFTPGATE_TEST_SMTP_PASSWORD", "wrong")
    with pytest.raises(PermanentEmailError, match="login failed: 535"):
        send(
            converted_message(),
            with_(cfg, username="mailer", password_env="SFTPGATE_TEST_SMTP_PASSWORD"),
        )
    assert auth.tries == [("PLAIN", "mailer", "wrong")]  # retries=3, yet one try
    assert handler.deliveries == []


def test_missing_password_is_permanent_and_names_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SFTPGATE_TEST_NO_SUCH_VAR", raising=False)
    base = SmtpConfig(username="mailer", sender=SENDER)
    missing = tmp_path / "nope.password"
    with pytest.raises(PermanentEmailError, match=r"smtp\.password_file .*nope\.password"):
        send(converted_message(), with_(base, password_file=missing))
    with pytest.raises(PermanentEmailError, match="SFTPGATE_TEST_NO_SUCH_VAR"):
        send(converted_message(), with_(base, password_env="SFTPGATE_TEST_NO_SUCH_VAR"))
    with pytest.raises(PermanentEmailError, match="neither password_file nor password_env"):
        read_password(base)
    assert read_password(SmtpConfig()) is None
