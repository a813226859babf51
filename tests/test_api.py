"""The admin HTTP API on a real `sftpgate serve`: real HTTP (urllib), real SFTP (paramiko)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from test_serve_process import ServeProcess

from conftest import PASSWORDS, free_port, write_config
from sftpgate.api.auth import new_token, token_hash

ADMIN = new_token()
READER = new_token()
TOKENS = [
    {"name": "ops", "hash": token_hash(ADMIN), "role": "admin"},
    {"name": "grafana", "hash": token_hash(READER), "role": "read"},
]


class Client:
    """Plain HTTP to the API: (status, headers, decoded JSON body or the raw text)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.port = port

    def __call__(
        self,
        method: str,
        path: str,
        token: str | None = ADMIN,
        body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        url = self.base + path  # always http://127.0.0.1:port/...
        request = urllib.request.Request(url, data=data, method=method, headers=sent)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                status, got, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, got, raw = exc.code, dict(exc.headers), exc.read()
        text = raw.decode()
        try:
            return status, got, json.loads(text)
        except ValueError:
            return status, got, text


def wait_for(predicate: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def sftp_session(port: int, login: str = "alice") -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    transport = paramiko.Transport(("127.0.0.1", port))
    transport.connect(username=login, password=PASSWORDS[login])
    sftp = paramiko.SFTPClient.from_transport(transport)
    assert sftp is not None
    return transport, sftp


class Served:
    def __init__(self, root: Path, config: Path, proc: ServeProcess, port: int, api: int) -> None:
        self.root, self.config, self.proc, self.port = root, config, proc, port
        self.http = Client(api)


def serve_with_api(
    root: Path, keys: dict[str, Path], **extra: dict[str, Any]
) -> tuple[Path, ServeProcess, int, int]:
    port, api = free_port(), free_port()
    sections: dict[str, Any] = {
        "server": {"port": port},
        "api": {"listen": f"127.0.0.1:{api}", "tokens": TOKENS, "disconnect_poll": 0.2},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    config = write_config(root, keys, sections)
    return config, ServeProcess(config), port, api


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, user_keys: dict[str, Path]
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("api")
    # Pipeline on, no workers: jobs stay queued for the job endpoints to act on.
    config, proc, port, api = serve_with_api(
        root,
        user_keys,
        pipeline={"enabled": True},
        jobs={"workers": 0},
        smtp={"host": "127.0.0.1", "port": 9, "from": "gateway@example.org"},
    )
    try:
        yield Served(root, config, proc, port, api)
    finally:
        proc.stop()


# -- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer " + new_token(),  # a well-formed token nobody configured
        "Bearer",
        "Bearer " + ADMIN + " extra",
        "Basic " + ADMIN,
        "bearer" + ADMIN,
        "Bearer " + "x" * 5000,
        "Bearer " + token_hash(ADMIN),  # the hash is not the token
    ],
)
def test_a_missing_wrong_or_malformed_token_gets_401_and_nothing_else(
    served: Served, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/bans"), ("GET", "/v1/no-such")):
        status, got, body = served.http(method, path, token=None, headers=headers)
        assert status == 401
        assert got["WWW-Authenticate"] == "Bearer"
        assert body == {"error": "unauthorized"}


def test_a_read_token_reads_but_may_not_act(served: Served) -> None:
    assert served.http("GET", "/v1/bans", token=READER)[0] == 200
    for method, path, body in (
        ("POST", "/v1/bans", {"address": "192.0.2.7"}),
        ("DELETE", "/v1/bans/192.0.2.7", None),
        ("POST", "/v1/jobs/1/retry", None),
        ("POST", "/v1/jobs/1/cancel", None),
        ("POST", "/v1/uploads/1/replay", None),
        ("POST", "/v1/sessions/abc/disconnect", None),
        ("POST", "/v1/users/reload", None),
    ):
        status, _, reply = served.http(method, path, token=READER, body=body)
        assert status == 403, (method, path)
        assert reply == {"error": "this token may only read"}
    # Nothing happened: the ban was never written.
    assert served.http("GET", "/v1/bans?all=true")[2] == {"bans": []}


def test_openapi_needs_no_token_and_names_bearer(served: Served) -> None:
    status, _, doc = served.http("GET", "/openapi.json", token=None)
    assert status == 200
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert set(doc["paths"]) >= {
        "/v1/journal",
        "/v1/journal/follow",
        "/v1/sessions",
        "/v1/sessions/{id}/disconnect",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/retry",
        "/v1/jobs/{id}/cancel",
        "/v1/uploads/{id}/replay",
        "/v1/users",
        "/v1/users/reload",
        "/v1/bans",
        "/v1/bans/{address}",
    }


# -- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "data", "status"),
    [
        ("GET", "/v1/jobs/abc", None, 400),
        ("GET", "/v1/jobs/-1", None, 400),
        ("GET", "/v1/jobs/99999999999999999999", None, 400),
        ("GET", "/v1/jobs?bogus=1", None, 400),
        ("GET", "/v1/jobs?limit=0", None, 400),
        ("GET", "/v1/jobs?state=nope", None, 400),
        ("GET", "/v1/jobs?limit=1&limit=2", None, 400),
        ("GET", "/v1/journal?since=yesterday", None, 400),
        ("GET", "/v1/journal?since=1h&until=2h", None, 400),
        ("GET", "/v1/journal?op=nope", None, 400),
        ("GET", "/v1/journal?failed=maybe", None, 400),
        ("GET", "/v1/journal?user=%00", None, 400),
        ("GET", "/v1/jobs/424242", None, 404),
        ("GET", "/v1/../../etc/passwd", None, 404),
        ("GET", "/v1/jobs/..%2F..%2Fetc", None, 400),
        ("DELETE", "/v1/bans/..", None, 400),
        ("POST", "/v1/bans", b"{not json", 400),
        ("POST", "/v1/bans", b"[1, 2]", 400),
        ("POST", "/v1/bans", b'{"address": "192.0.2.1", "evil": 1}', 400),
        ("POST", "/v1/bans", b'{"address": "192.0.2.1", "seconds": -5}', 400),
        ("POST", "/v1/bans", b'{"address": "not-an-ip"}', 400),
        ("POST", "/v1/bans", b"[" * 100000 + b"]" * 100000, 413),
        ("POST", "/v1/bans", b'{"address": "' + b"1" * 70000 + b'"}', 413),
        ("PUT", "/v1/jobs", None, 405),
    ],
)
def test_hostile_requests_get_a_clear_json_4xx(
    served: Served, method: str, path: str, data: bytes | None, status: int
) -> None:
    got, headers, body = served.http(method, path, data=data)
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict) and isinstance(body["error"], str)
    assert "Traceback" not in body["error"]


def test_a_body_that_is_not_json_typed_is_refused(served: Served) -> None:
    status, _, body = served.http(
        "POST", "/v1/bans", data=b"address=1.2.3.4", headers={"Content-Type": "text/plain"}
    )
    assert status == 400 and "JSON" in body["error"]


# -- the journal -----------------------------------------------------------------------------


def cli_json(config: Path, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "sftpgate", *args, "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_journal_pages_match_the_cli_rows_and_filters(served: Served) -> None:
    transport, sftp = sftp_session(served.port)
    try:
        for i in range(5):
            with sftp.open(f"/page-{i}.txt", "w") as f:
                f.write(b"x" * (i + 1))
        with pytest.raises(OSError):
            sftp.stat("/missing")
    finally:
        transport.close()

    def alice_rows() -> list[dict[str, Any]]:
        rows = cli_json(served.config, "journal", "--user", "alice")
        return rows if any(r["op"] == "logout" for r in rows) else []

    expected = wait_for(alice_rows, what="alice's logout in the journal")
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = "/v1/journal?user=alice&limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, _, page = served.http("GET", query, token=READER)
        assert status == 200
        assert len(page["rows"]) <= 3
        pages.extend(page["rows"])
        cursor = page["cursor"]
        if not page["more"]:
            break
    assert pages == expected  # same rows, same shape, none twice, none skipped
    status, _, failed = served.http("GET", "/v1/journal?user=alice&failed=true&op=stat")
    assert [r["path"] for r in failed["rows"]] == ["/missing"]
    assert failed["rows"] == cli_json(
        served.config, "journal", "--user", "alice", "--failed", "--op", "stat"
    )
    status, _, transfers = served.http("GET", "/v1/journal?user=alice&transfers=true")
    assert len(transfers["rows"]) == 5 and all(r["upload_state"] for r in transfers["rows"])
    # Paging on from the last cursor: nothing new yet, and the cursor holds.
    status, _, rest = served.http("GET", f"/v1/journal?user=alice&cursor={cursor}")
    assert rest["rows"] == [] and rest["cursor"] is not None


def test_every_request_is_journaled_with_the_token_name_never_the_token(served: Served) -> None:
    served.http("GET", "/v1/users", token=READER)
    served.http("GET", "/v1/users", token="wrong-" + ADMIN)

    def admin_rows() -> list[dict[str, Any]]:
        rows = served.http("GET", "/v1/journal?op=admin")[2]["rows"]
        ok = [r for r in rows if r["login"] == "grafana" and r["path"] == "/v1/users"]
        refused = [r for r in rows if r["status"] == "http_401" and r["path"] == "/v1/users"]
        return rows if ok and refused else []

    rows = wait_for(admin_rows, what="admin rows")
    refused = next(r for r in rows if r["status"] == "http_401")
    assert refused["login"] is None and refused["attrs"]["token"] is None
    assert refused["remote_addr"] == "127.0.0.1" and refused["message"] == "GET 401"
    text = (served.root / "state" / "journal.sqlite3").read_bytes()
    assert ADMIN.encode() not in text and READER.encode() not in text


def open_follow(port: int, query: str) -> tuple[http.client.HTTPConnection, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/journal/follow" + query, headers={"Authorization": f"Bearer {READER}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-ndjson"
    return conn, response


def test_follow_streams_new_rows_as_json_lines(served: Served) -> None:
    conn, response = open_follow(served.http.port, "?user=carol&op=login,mkdir")
    try:
        transport, sftp = sftp_session(served.port, "carol")
        try:
            sftp.mkdir("/followed")
        finally:
            transport.close()
        first, second = json.loads(response.readline()), json.loads(response.readline())
        assert (first["op"], first["login"]) == ("login", "carol")
        assert (second["op"], second["path"]) == ("mkdir", "/followed")
        assert set(first) >= {"id", "time", "session_id", "node"}  # the CLI's --json shape
    finally:
        conn.close()


# -- sessions, disconnect, reload: with two gateway processes ----------------------------------


def upload(port: int, path: str, data: bytes, login: str = "alice") -> None:
    transport, sftp = sftp_session(port, login)
    try:
        with sftp.open(path, "w") as f:
            f.write(data)
    finally:
        transport.close()


def test_jobs_list_show_cancel_retry_and_replay_an_upload(served: Served) -> None:
    upload(served.port, "/clip.mp4", b"not really a video")

    def queued() -> list[dict[str, Any]]:
        jobs = served.http("GET", "/v1/jobs?user=alice&state=queued", token=READER)[2]["jobs"]
        return [j for j in jobs if j["path"] == "/clip.mp4"]

    (job,) = wait_for(queued, what="the upload's job")
    assert served.http("GET", f"/v1/jobs/{job['id']}", token=READER)[2] == job
    assert [j["id"] for j in cli_json(served.config, "jobs", "list")] == [
        j["id"] for j in served.http("GET", "/v1/jobs")[2]["jobs"]
    ]
    # The upload still has a live job: no replay.
    status, _, body = served.http("POST", f"/v1/uploads/{job['upload_id']}/replay")
    assert status == 409 and f"job {job['id']}" in body["error"]
    status, _, cancelled = served.http("POST", f"/v1/jobs/{job['id']}/cancel")
    assert (status, cancelled["state"]) == (200, "cancelled")
    status, _, body = served.http("POST", f"/v1/jobs/{job['id']}/cancel")
    assert status == 409 and "nothing to cancel" in body["error"]
    status, _, retried = served.http("POST", f"/v1/jobs/{job['id']}/retry")
    assert (status, retried["state"]) == (200, "queued")
    served.http("POST", f"/v1/jobs/{job['id']}/cancel")
    # Replayed: a new job on the same upload and the same file.
    status, _, again = served.http("POST", f"/v1/uploads/{job['upload_id']}/replay")
    assert status == 201, again
    assert again["id"] != job["id"] and again["state"] == "queued"
    assert again["upload_id"] == job["upload_id"] and again["data"]["replay"] is True
    served.http("POST", f"/v1/jobs/{again['id']}/cancel")
    # The file changed since: refused, and nothing is queued.
    home = served.root / "homes" / "alice"
    (home / "clip.mp4").write_bytes(b"something else entirely, longer")
    status, _, body = served.http("POST", f"/v1/uploads/{job['upload_id']}/replay")
    assert status == 409 and "changed" in body["error"]
    (home / "clip.mp4").unlink()
    status, _, body = served.http("POST", f"/v1/uploads/{job['upload_id']}/replay")
    assert status == 404 and "gone" in body["error"]
    assert served.http("POST", "/v1/uploads/987654/replay")[0] == 404
    assert queued() == []


def test_bans_add_list_and_lift(served: Served) -> None:
    status, _, ban = served.http(
        "POST", "/v1/bans", body={"address": "198.51.100.9", "seconds": 600, "reason": "test"}
    )
    assert status == 201 and ban["address"] == "198.51.100.9" and ban["active"] is True
    listed = served.http("GET", "/v1/bans", token=READER)[2]["bans"]
    assert listed == cli_json(served.config, "bans", "list")
    assert [b["address"] for b in listed] == ["198.51.100.9"]
    assert served.http("DELETE", "/v1/bans/198.51.100.9")[2] == {
        "address": "198.51.100.9",
        "lifted": True,
    }
    status, _, body = served.http("DELETE", "/v1/bans/198.51.100.9")
    assert status == 404 and "not banned" in body["error"]
    ops = served.http("GET", "/v1/journal?op=ban,unban")[2]["rows"]
    assert [r["op"] for r in ops][-2:] == ["ban", "unban"]
    assert "admin API (ops)" in ops[-1]["message"]


def test_users_list_and_reload(served: Served) -> None:
    status, _, body = served.http("GET", "/v1/users", token=READER)
    assert status == 200
    assert body["users"] == cli_json(served.config, "users", "list")
    raw = yaml.safe_load(served.config.read_text())
    raw["users"].append({**raw["users"][0], "login": "dave", "home": "homes/dave"})
    served.config.write_text(yaml.safe_dump(raw))
    try:
        status, _, body = served.http("POST", "/v1/users/reload")
        assert (status, body["reloaded"]) == (200, True)
        assert "dave" in [u["login"] for u in served.http("GET", "/v1/users")[2]["users"]]
        served.config.write_text("users: [{login: 'Not Valid'}]\n")
        status, _, body = served.http("POST", "/v1/users/reload")
        assert status == 422 and "old config stays" in body["error"]
        assert "dave" in [u["login"] for u in served.http("GET", "/v1/users")[2]["users"]]
    finally:
        raw["users"].pop()
        served.config.write_text(yaml.safe_dump(raw))
        served.http("POST", "/v1/users/reload")


# -- two gateway processes: sessions, disconnect, the drain -----------------------------------


def test_disconnect_ends_a_live_session_in_any_gateway_process_and_follow_ends_at_drain(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config, proc, port, api = serve_with_api(tmp_path, user_keys, server={"processes": 2})
    http = Client(api)
    try:
        sessions = [sftp_session(port, "alice") for _ in range(4)]  # spread over both processes

        def live() -> list[dict[str, Any]]:
            rows = http("GET", "/v1/sessions?user=alice", token=READER)[2]["sessions"]
            return rows if len(rows) == 4 else []

        rows = wait_for(live, what="four live sessions")
        assert all(r["login"] == "alice" and r["ended_at"] is None for r in rows)
        conn, follow = open_follow(api, "?op=disconnect,logout")
        for row in rows:
            status, _, asked = http("POST", f"/v1/sessions/{row['id']}/disconnect")
            assert status == 202 and asked["disconnect_requested_at"] is not None
        for transport, _ in sessions:
            wait_for(lambda t=transport: not t.is_active(), what="the session to end")
        seen = [json.loads(follow.readline()) for _ in range(8)]
        assert sorted(r["op"] for r in seen) == ["disconnect"] * 4 + ["logout"] * 4
        assert {r["session_id"] for r in seen} == {r["id"] for r in rows}
        assert all(
            r["message"] == "disconnected by an administrator (ops)"
            for r in seen
            if r["op"] == "disconnect"
        )
        wait_for(lambda: http("GET", "/v1/sessions")[2]["sessions"] == [], what="no sessions")
        status, _, body = http("POST", f"/v1/sessions/{rows[0]['id']}/disconnect")
        assert status == 404 and "no live session" in body["error"]
        # The supervisor's reload: every child re-reads the file; a restart key is refused.
        status, _, body = http("POST", "/v1/users/reload")
        assert (status, body) == (200, {"reloaded": True, "users": 3})
        raw = yaml.safe_load(config.read_text())
        raw["server"]["io_threads"] = 3
        config.write_text(yaml.safe_dump(raw))
        status, _, body = http("POST", "/v1/users/reload")
        assert status == 422 and "server.io_threads" in body["error"]
        # The drain: the follow ends cleanly (a proper end of the chunked stream), exit 0.
        assert proc.stop() == 0
        assert follow.read() == b""
        conn.close()
    finally:
        if proc.proc.poll() is None:
            proc.stop()


def test_api_token_prints_a_token_whose_hash_the_config_takes(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from sftpgate.cli.main import main
    from sftpgate.config import load_config

    assert main(["api", "token", "--name", "ci", "--role", "read"]) == 0
    out = capsys.readouterr().out.splitlines()
    token, line = out[1].strip(), out[-1].strip()
    entry = yaml.safe_load(line)[0]
    assert entry == {"name": "ci", "hash": token_hash(token), "role": "read"}
    assert token not in line
    config = load_config(write_config(tmp_path, user_keys, {"api": {"tokens": [entry]}}))
    assert config.api.tokens[0].hash == token_hash(token)
    assert main(["api", "token", "--name", "bad name", "--role", "read"]) == 2
    assert main(["api", "token", "--name", "ci", "--role", "read", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hash"] == token_hash(printed["token"]) and printed["role"] == "read"


def test_a_token_hash_that_is_not_one_is_a_config_error(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    from sftpgate.config import load_config
    from sftpgate.errors import ConfigError

    for tokens, message in (
        ([{"name": "a", "hash": ADMIN, "role": "admin"}], "api.tokens[0].hash"),
        ([{"name": "a", "hash": token_hash(ADMIN), "role": "root"}], "api.tokens[0].role"),
        ([TOKENS[0], {**TOKENS[1], "name": "ops"}], "api.tokens[1].name: duplicate"),
        ([{**TOKENS[0], "token": ADMIN}], "api.tokens[0]: unknown key"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(write_config(tmp_path, user_keys, {"api": {"tokens": tokens}}))
