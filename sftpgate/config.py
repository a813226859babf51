"""``config.yaml``: load, override from the environment, validate, freeze.

Every error names the file and the key, e.g.
``config.yaml: users[2].email: not an email address``. Relative paths resolve
against the folder of the config file. ``SFTPGATE_<SECTION>__<KEY>=value``
overrides any key of a section (``SFTPGATE_SERVER__PORT=2300``); the value is
read as YAML, so numbers and booleans keep their type.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

ENV_PREFIX = "SFTPGATE_"

_LOGIN_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")


@dataclass(frozen=True, slots=True)
class User:
    login: str
    name: str
    surname: str
    email: str
    home: Path
    password_hash: str | None = None
    authorized_keys: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "0.0.0.0"  # noqa: S104 - a server's default is to listen
    port: int = 2222
    state_dir: Path = Path("/var/lib/sftpgate")
    host_keys_dir: Path = Path("/etc/sftpgate/hostkeys")
    create_homes: bool = False
    io_threads: int = 32
    # Metadata calls of homes wholly on local disks run on the event loop
    # (see frontdoor/mounts.py); NFS, FUSE and unknown filesystems never do.
    inline_local_metadata: bool = True
    # Likewise quick changes: create, small write batches, close, mkdir,
    # rename, remove, setstat (frontdoor/inline.py: a slow one turns it off).
    inline_local_changes: bool = True
    login_timeout: float = 60.0
    max_auth_attempts: int = 6
    # Masked off the modes clients ask for when users create files and folders
    # (as sftp-server -u), whatever the process umask (systemd's UMask=0077).
    umask: int = 0o022


@dataclass(frozen=True, slots=True)
class JournalConfig:
    enabled: bool = True
    path: Path | None = None  # default: <state_dir>/journal.sqlite3
    synchronous: str = "full"
    batch_max: int = 1000
    # Seconds plain records gather before their commit (durable ones don't wait).
    commit_interval: float = 0.02
    # Seconds a client's CLOSE (or RENAME) waits for its upload's commit before
    # it gets an SFTP failure ("upload not recorded, try again") instead of a hang.
    durable_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str = "localhost"
    port: int = 25
    security: str = "none"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    sender: str = "sftpgate@localhost"
    timeout: float = 30.0
    # Transient failures (refused, 4xx) are retried this many times, waiting
    # retry_wait * 2^n seconds between tries, before the job step fails and the
    # job itself is retried later with its own backoff.
    retries: int = 3
    retry_wait: float = 2.0


DEFAULT_PATTERNS = tuple(
    f"*.{ext}" for ext in ("avi", "mov", "mp4", "m4v", "mpg", "mpeg", "wmv", "mkv", "webm", "flv")
)
DEFAULT_TEMP_PATTERNS = ("*.filepart", "*.part", "*.tmp")
# ffprobe format_name values (each entry may be a comma list, as ffprobe prints them).
DEFAULT_CONTAINERS = (
    "avi",
    "mov",
    "mp4",
    "m4a",
    "3gp",
    "3g2",
    "mj2",
    "mpeg",
    "mpegts",
    "mpegvideo",
    "asf",
    "matroska",
    "webm",
    "flv",
)
DEFAULT_VIDEO_CODECS = (
    "h264",
    "hevc",
    "mpeg4",
    "mpeg1video",
    "mpeg2video",
    "msmpeg4v2",
    "msmpeg4v3",
    "wmv1",
    "wmv2",
    "wmv3",
    "vc1",
    "vp8",
    "vp9",
    "av1",
    "flv1",
    "theora",
    "mjpeg",
    "h263",
)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    enabled: bool = True
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    temp_patterns: tuple[str, ...] = DEFAULT_TEMP_PATTERNS
    output_dir: str = "converted"
    allowed_containers: tuple[str, ...] = DEFAULT_CONTAINERS
    allowed_video_codecs: tuple[str, ...] = DEFAULT_VIDEO_CODECS
    max_duration: float = 4 * 3600.0
    max_width: int = 7680
    max_height: int = 4320
    max_size: int = 50 * 1024**3
    thumbnails: int = 10
    thumbnail_width: int = 320
    poster_width: int = 640
    crf: int = 23
    preset: str = "veryfast"
    audio_bitrate: str = "128k"
    ffmpeg: str = "ffmpeg"
    ffprobe: str = "ffprobe"
    timeout: float = 3 * 3600.0
    nice: int = 10
    memory_limit: int = 4 * 1024**3
    # Largest file ffmpeg may write (RLIMIT_FSIZE): a crafted input cannot fill the disk.
    max_output_size: int = 8 * 1024**3
    threads: int = 0
    # Extra ffmpeg input options, e.g. ["-readrate", "1"]; for special inputs.
    input_args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JobsConfig:
    workers: int = 2
    max_attempts: int = 5
    backoff_base: float = 30.0
    backoff_max: float = 3600.0
    lease_seconds: float = 60.0
    poll_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class EmailConfig:
    enabled: bool = True
    templates_dir: Path | None = None
    admin: str | None = None  # told when a job goes dead


@dataclass(frozen=True, slots=True)
class SubsystemConfig:
    # The daemon side runs in `serve` when enabled: a Unix socket for taps.
    enabled: bool = False
    sftp_server: str = "/usr/lib/openssh/sftp-server"
    socket: Path = Path("/run/sftpgate/events.sock")
    # World-writable with the sticky bit (like /tmp): each user's tap may
    # create its own spool files there; the daemon replays and removes them.
    spool_dir: Path = Path("/var/spool/sftpgate")
    replay_interval: float = 10.0
    ack_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    json: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    server: ServerConfig
    journal: JournalConfig
    smtp: SmtpConfig
    log: LogConfig
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    email: EmailConfig = field(default_factory=EmailConfig)
    subsystem: SubsystemConfig = field(default_factory=SubsystemConfig)
    users: tuple[User, ...] = field(default_factory=tuple)

    @property
    def journal_path(self) -> Path:
        return self.journal.path or self.server.state_dir / "journal.sqlite3"

    def user(self, login: str) -> User | None:
        for user in self.users:
            if user.login == login:
                return user
        return None


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
}


class _Reader:
    """Pulls typed values out of one mapping, naming ``file: key`` in every error."""

    def __init__(self, file: str, base: Path, data: Mapping[str, Any], where: str) -> None:
        self.file, self.base, self.data, self.where = file, base, data, where
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self._key(key)}: {message}")

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            name = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(key, f"must be {name}, got {type(value).__name__}")
        return value

    def required_str(self, key: str) -> str:
        value = self.get(key, str, None)
        if value is None or not value.strip():
            raise self.error(key, "is required")
        return str(value)

    def port(self, key: str, default: int) -> int:
        value = int(self.get(key, int, default))
        if not 0 <= value <= 65535:
            raise self.error(key, "must be a port number (0-65535)")
        return value

    def positive(self, key: str, kind: type, default: float) -> Any:
        value = self.get(key, kind, default)
        if value <= 0:
            raise self.error(key, "must be greater than 0")
        return value

    def nonnegative(self, key: str, kind: type, default: float) -> Any:
        value = self.get(key, kind, default)
        if value < 0:
            raise self.error(key, "must not be negative")
        return value

    def even(self, key: str, default: int) -> int:
        value = int(self.positive(key, int, default))
        if value % 2:
            raise self.error(key, "must be an even number of pixels")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, list, None)
        if value is None:
            return default
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(f"{key}[{index}]", "must be a non-empty string")
        return tuple(value)

    def path(self, key: str, default: Path | None) -> Path | None:
        value = self.get(key, str, None)
        if value is None:
            return default
        return (self.base / os.path.expanduser(str(value))).resolve()

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = str(self.get(key, str, default)).lower()
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}")
        return value

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise self.error(str(key), "unknown key")


def _section(file: str, base: Path, raw: Mapping[str, Any], name: str) -> _Reader:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{file}: {name}: must be a mapping")
    return _Reader(file, base, value, name)


def _server(r: _Reader) -> ServerConfig:
    d = ServerConfig()
    cfg = ServerConfig(
        listen=r.get("listen", str, d.listen),
        port=r.port("port", d.port),
        state_dir=r.path("state_dir", d.state_dir) or d.state_dir,
        host_keys_dir=r.path("host_keys_dir", d.host_keys_dir) or d.host_keys_dir,
        create_homes=r.get("create_homes", bool, d.create_homes),
        io_threads=r.positive("io_threads", int, d.io_threads),
        inline_local_metadata=r.get("inline_local_metadata", bool, d.inline_local_metadata),
        inline_local_changes=r.get("inline_local_changes", bool, d.inline_local_changes),
        login_timeout=r.positive("login_timeout", float, d.login_timeout),
        max_auth_attempts=r.positive("max_auth_attempts", int, d.max_auth_attempts),
        umask=_umask(r, d.umask),
    )
    r.finish()
    return cfg


def _umask(r: _Reader, default: int) -> int:
    """An octal mask: 18 (YAML reads 0022 as octal), "022" or "0o022"."""
    value = r.get("umask", (int, str), default)
    if isinstance(value, str):
        try:
            value = int(value.removeprefix("0o"), 8)
        except ValueError:
            raise r.error("umask", f"must be an octal mask such as 022, got {value!r}") from None
    if not 0 <= value <= 0o777:
        raise r.error("umask", "must be between 000 and 777 (octal)")
    return int(value)


def _journal(r: _Reader) -> JournalConfig:
    d = JournalConfig()
    cfg = JournalConfig(
        enabled=r.get("enabled", bool, d.enabled),
        path=r.path("path", None),
        synchronous=r.choice("synchronous", ("full", "normal"), d.synchronous),
        batch_max=r.positive("batch_max", int, d.batch_max),
        commit_interval=r.nonnegative("commit_interval", float, d.commit_interval),
        durable_timeout=r.positive("durable_timeout", float, d.durable_timeout),
    )
    r.finish()
    return cfg


def _smtp(r: _Reader) -> SmtpConfig:
    d = SmtpConfig()
    cfg = SmtpConfig(
        host=r.get("host", str, d.host),
        port=r.port("port", d.port),
        security=r.choice("security", ("none", "starttls", "tls"), d.security),
        username=r.get("username", str, None),
        password_file=r.path("password_file", None),
        password_env=r.get("password_env", str, None),
        sender=r.get("from", str, d.sender),
        timeout=r.positive("timeout", float, d.timeout),
        retries=r.nonnegative("retries", int, d.retries),
        retry_wait=r.nonnegative("retry_wait", float, d.retry_wait),
    )
    if not _EMAIL_RE.match(cfg.sender):
        raise r.error("from", "not an email address")
    r.finish()
    return cfg


def _pipeline(r: _Reader) -> PipelineConfig:
    d = PipelineConfig()
    output_dir = r.get("output_dir", str, d.output_dir).strip("/")
    if not output_dir or ".." in output_dir.split("/"):
        raise r.error("output_dir", "must be a folder inside the home, without ..")
    cfg = PipelineConfig(
        enabled=r.get("enabled", bool, d.enabled),
        patterns=r.strings("patterns", d.patterns),
        temp_patterns=r.strings("temp_patterns", d.temp_patterns),
        output_dir=output_dir,
        allowed_containers=r.strings("allowed_containers", d.allowed_containers),
        allowed_video_codecs=r.strings("allowed_video_codecs", d.allowed_video_codecs),
        max_duration=r.positive("max_duration", float, d.max_duration),
        max_width=r.positive("max_width", int, d.max_width),
        max_height=r.positive("max_height", int, d.max_height),
        max_size=r.positive("max_size", int, d.max_size),
        thumbnails=r.nonnegative("thumbnails", int, d.thumbnails),
        thumbnail_width=r.even("thumbnail_width", d.thumbnail_width),
        poster_width=r.even("poster_width", d.poster_width),
        crf=r.nonnegative("crf", int, d.crf),
        preset=r.choice(
            "preset",
            (
                "ultrafast",
                "superfast",
                "veryfast",
                "faster",
                "fast",
                "medium",
                "slow",
                "slower",
                "veryslow",
            ),
            d.preset,
        ),
        audio_bitrate=r.get("audio_bitrate", str, d.audio_bitrate),
        ffmpeg=r.get("ffmpeg", str, d.ffmpeg),
        ffprobe=r.get("ffprobe", str, d.ffprobe),
        timeout=r.positive("timeout", float, d.timeout),
        nice=r.nonnegative("nice", int, d.nice),
        memory_limit=r.positive("memory_limit", int, d.memory_limit),
        max_output_size=r.positive("max_output_size", int, d.max_output_size),
        threads=r.nonnegative("threads", int, d.threads),
        input_args=r.strings("input_args", d.input_args),
    )
    r.finish()
    return cfg


def _jobs(r: _Reader) -> JobsConfig:
    d = JobsConfig()
    cfg = JobsConfig(
        workers=r.nonnegative("workers", int, d.workers),
        max_attempts=r.positive("max_attempts", int, d.max_attempts),
        backoff_base=r.positive("backoff_base", float, d.backoff_base),
        backoff_max=r.positive("backoff_max", float, d.backoff_max),
        lease_seconds=r.positive("lease_seconds", float, d.lease_seconds),
        poll_interval=r.positive("poll_interval", float, d.poll_interval),
    )
    r.finish()
    return cfg


def _subsystem(r: _Reader) -> SubsystemConfig:
    d = SubsystemConfig()
    cfg = SubsystemConfig(
        enabled=r.get("enabled", bool, d.enabled),
        sftp_server=r.get("sftp_server", str, d.sftp_server),
        socket=r.path("socket", d.socket) or d.socket,
        spool_dir=r.path("spool_dir", d.spool_dir) or d.spool_dir,
        replay_interval=r.positive("replay_interval", float, d.replay_interval),
        ack_timeout=r.positive("ack_timeout", float, d.ack_timeout),
    )
    r.finish()
    return cfg


def _email(r: _Reader) -> EmailConfig:
    admin = r.get("admin", str, None)
    if admin is not None and not _EMAIL_RE.match(admin):
        raise r.error("admin", "not an email address")
    cfg = EmailConfig(
        enabled=r.get("enabled", bool, True),
        templates_dir=r.path("templates_dir", None),
        admin=admin,
    )
    r.finish()
    return cfg


def _log(r: _Reader) -> LogConfig:
    d = LogConfig()
    cfg = LogConfig(
        level=r.choice("level", ("debug", "info", "warning", "error"), d.level),
        json=r.get("json", bool, d.json),
    )
    r.finish()
    return cfg


def _authorized_keys(r: _Reader) -> tuple[str, ...]:
    value = r.get("authorized_keys", (list, str), [])
    lines = [value] if isinstance(value, str) else value
    if not lines:
        return ()
    # Imported here: `sftpgate subsystem` loads a config without keys for every
    # OpenSSH session and must not pay for asyncssh (~0.1 s).
    import asyncssh

    keys: list[str] = []
    for index, line in enumerate(lines):
        where = f"authorized_keys[{index}]"
        if not isinstance(line, str):
            raise r.error(where, "must be a string (one OpenSSH public key line, no options)")
        try:
            asyncssh.import_public_key(line)
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise r.error(where, f"not an OpenSSH public key: {exc}") from None
        keys.append(line.strip())
    return tuple(keys)


def _user(r: _Reader) -> User:
    login = r.required_str("login")
    if not _LOGIN_RE.match(login):
        raise r.error("login", "must be lowercase letters, digits, '_', '.', '-' (max 32)")
    email = r.required_str("email")
    if not _EMAIL_RE.match(email):
        raise r.error("email", "not an email address")
    home = r.path("home", None)
    if home is None:
        raise r.error("home", "is required")
    password_hash = r.get("password_hash", str, None)
    if password_hash is not None:
        # Imported here: importing passwords computes its dummy hash (scrypt, ~0.1 s).
        from .passwords import check_hash_format

        problem = check_hash_format(password_hash)
        if problem:
            raise r.error("password_hash", problem)
    keys = _authorized_keys(r)
    user = User(
        login=login,
        name=r.required_str("name"),
        surname=r.required_str("surname"),
        email=email,
        home=home,
        password_hash=password_hash,
        authorized_keys=keys,
        uid=r.get("uid", int, None),
        gid=r.get("gid", int, None),
    )
    r.finish()
    return user


def _users(file: str, base: Path, raw: Mapping[str, Any]) -> tuple[User, ...]:
    value = raw.get("users") or []
    if not isinstance(value, list):
        raise ConfigError(f"{file}: users: must be a list")
    users: list[User] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        where = f"users[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{file}: {where}: must be a mapping")
        user = _user(_Reader(file, base, item, where))
        if user.login in seen:
            raise ConfigError(f"{file}: {where}.login: duplicate login {user.login!r}")
        seen.add(user.login)
        users.append(user)
    return tuple(users)


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str], file: str) -> None:
    """Apply ``SFTPGATE_<SECTION>__<KEY>[__<KEY>...]`` variables to ``raw`` in place."""
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{file}: environment {name}: empty key")
        node: dict[str, Any] = raw
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an empty section (`smtp:`)
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"{file}: environment {name}: {part} is not a mapping")
            node = child
        try:
            node[path[-1]] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            node[path[-1]] = text


_SECTIONS: dict[str, Callable[[_Reader], Any]] = {
    "server": _server,
    "journal": _journal,
    "smtp": _smtp,
    "log": _log,
    "pipeline": _pipeline,
    "jobs": _jobs,
    "email": _email,
    "subsystem": _subsystem,
}


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate a config file.

    Raises :class:`ConfigError` naming the file and the key for any problem.
    """
    file = os.fspath(path)
    config_path = Path(file).resolve()
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping")
    apply_env_overrides(raw, os.environ if environ is None else environ, file)
    for key in raw:
        if key not in _SECTIONS and key != "users":
            raise ConfigError(f"{file}: {key}: unknown key")
    base = config_path.parent
    sections = {name: build(_section(file, base, raw, name)) for name, build in _SECTIONS.items()}
    return Config(path=config_path, users=_users(file, base, raw), **sections)


# What ``sftpgate serve`` reads only once, at start (a section name stands for
# all its keys). A reload (SIGHUP) that changes any of them is refused whole;
# every other key (users, pipeline, email, smtp, the rest of jobs and server)
# is swapped in together.
RESTART_KEYS = (
    "server.listen",
    "server.port",
    "server.state_dir",
    "server.host_keys_dir",
    "server.io_threads",
    "server.login_timeout",
    "journal",
    "pipeline.enabled",
    "jobs.workers",
    "jobs.lease_seconds",
    "jobs.poll_interval",
    "subsystem",
    "log",
)


def restart_keys_changed(old: Config, new: Config) -> list[str]:
    """The keys of :data:`RESTART_KEYS` whose values differ between ``old`` and ``new``. Pure."""
    changed: list[str] = []
    for key in RESTART_KEYS:
        section, _, name = key.partition(".")
        before, after = getattr(old, section), getattr(new, section)
        if not name:
            changed += [
                f"{section}.{f}"
                for f in before.__dataclass_fields__
                if getattr(before, f) != getattr(after, f)
            ]
        elif getattr(before, name) != getattr(after, name):
            changed.append(key)
    return changed


def check_homes(config: Config) -> list[str]:
    """Return problems with users' homes that would stop them logging in."""
    problems: list[str] = []
    if config.server.create_homes:
        return problems
    for index, user in enumerate(config.users):
        if not user.home.is_dir():
            problems.append(
                f"{config.path.name}: users[{index}].home: {user.home} is not a directory "
                "(create it, or set server.create_homes: true)"
            )
    return problems
