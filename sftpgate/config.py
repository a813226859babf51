"""``config.yaml``: every key declared once, then load, override from the environment, validate.

Each key is one dataclass field below: its type, its default, its rule, a
one-line doc and, for a key ``sftpgate serve`` reads only at start, why a
reload cannot take it. :mod:`sftpgate.configschema` reads YAML into these
classes and renders them as ``docs/configuration.md``
(``sftpgate check-config --docs``).

Every error names the file and the key, e.g.
``config.yaml: users[2].email: not an email address``. Relative paths resolve
against the folder of the config file. ``SFTPGATE_<SECTION>__<KEY>=value``
overrides any key of a section (``SFTPGATE_SERVER__PORT=2300``); the value is
read as YAML, so numbers and booleans keep their type.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .configschema import (
    EVEN,
    NONNEGATIVE,
    OCTAL,
    PORT,
    POSITIVE,
    Invalid,
    Rule,
    Source,
    key,
    matching,
    one_of,
    read,
    required,
    restart_markdown,
    section_markdown,
    spec_of,
    yaml_name,
)
from .errors import ConfigError

ENV_PREFIX = "SFTPGATE_"

EMAIL = matching(r"^[^@\s]+@[^@\s]+$", "not an email address", "an email address")
LOGIN = matching(
    r"^[a-z_][a-z0-9_.-]{0,31}$",
    "must be lowercase letters, digits, '_', '.', '-' (max 32)",
    "lowercase letters, digits, `_ . -`, at most 32",
)

# Why a reload (SIGHUP) cannot take a key: ``sftpgate serve`` reads it only at start.
_LISTENER = "the listening socket is opened once"
_STATE = "the state folder and host keys are prepared and loaded at start"
_POOL = "the size of the filesystem thread pool"
_SSH = "given to the SSH listener when it starts"
_JOURNAL = (
    "the journal writer (file, `synchronous`, batching) is opened once; "
    "`synchronous` also decides the fsync at CLOSE"
)
_WORKERS_STARTED = "whether embedded workers are started at all"
_WORKERS = "the worker tasks are started, and keep these, at start"
_TAP = "the tap socket and spool are set up at start"
_LOG = "logging is set up at start"
_SWEEP = "the session sweeper (journal/sweep.py) is started once, at start"


def _processes(value: int | str) -> int:
    if isinstance(value, str):
        if value.lower() != "auto":
            raise Invalid(f"must be an integer or auto, got {value!r}")
        return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or value <= 0:
        raise Invalid("must be greater than 0")
    return value


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The SSH listener of `sftpgate serve`, its state and how it touches users' files."""

    listen: str = key("0.0.0.0", "address to listen on", restart=_LISTENER)  # noqa: S104
    port: int = key(2222, "TCP port (0 = any free port)", PORT, restart=_LISTENER)
    state_dir: Path = key(
        Path("/var/lib/sftpgate"),
        "journal and other state; the folder is 0700 and the journal (with its `-wal`, `-shm`) "
        "0600 whatever the umask, and looser ones are tightened at start, with a warning",
        restart=_STATE,
    )
    host_keys_dir: Path = key(
        Path("/etc/sftpgate/hostkeys"),
        "host keys (ed25519 and RSA), created on first start and reused after; the folder is "
        "0700 and every file in it 0600 (the `.pub` halves too) whatever the umask, looser "
        "ones tightened at start, with a warning",
        restart=_STATE,
    )
    create_homes: bool = key(
        False, "create missing homes at start; otherwise a missing home is a config error"
    )
    io_threads: int = key(
        32, "threads for filesystem calls (a hung NFS call holds one)", POSITIVE, restart=_POOL
    )
    inline_local_metadata: bool = key(
        True,
        "a session whose home (and everything mounted below it) is on local disks (ext4, xfs, "
        "btrfs, zfs, tmpfs, overlay…) makes read-only metadata calls — stat, lstat, fstat, "
        "realpath, readlink, opening to read — on the event loop, saving two thread wake-ups "
        "per request; NFS, FUSE and unknown filesystems always use the pool. `false`: in the "
        "pool",
    )
    inline_local_changes: bool = key(
        True,
        "the same for quick changes: creating a file (or truncating one of at most 64 KiB), "
        "mkdir, rmdir, symlink, link, and every write and the close of a file while it holds "
        "at most 64 KiB (small uploads: ~20% more files/s here). Reads, listings, fsync, "
        "remove, rename, setstat (they can free a big file's blocks) and bigger files' writes "
        "always use the pool. Any inline call that takes over 2 ms and slept in the kernel on "
        "the way (ext4 waiting on its journal, writes throttled behind a busy disk; not merely "
        "another process holding the CPU) sends every call of the gateway to the pool for 1 s "
        "and logs a warning; each time calls are slow again right after, the pause doubles, up "
        "to 30 s. What the guard cannot cut short is a call that never returns: on a "
        "filesystem frozen for a snapshot (`fsfreeze`, LVM) a create waits for the thaw, and "
        "inline that holds every session. `false`: in the pool",
    )
    requests_in_flight: int = key(
        2,
        "most requests of one SFTP session waiting at once (a read or a stat in the thread "
        "pool, a WRITE waiting for write-behind room): requests that do not depend on each "
        "other — READs, stats, requests about other handles — run side by side up to this, "
        "their replies in the order they finish; requests about the same file keep their "
        "order. 2 suits local disks (one read copies while the loop encrypts the last reply: "
        "[benchmarks](benchmarks.md#findings)); a home on NFS, where a read waits on the "
        "network, may want more",
        POSITIVE,
    )
    login_timeout: float = key(
        60.0, "time a client has to authenticate", POSITIVE, unit="seconds", restart=_SSH
    )
    max_auth_attempts: int = key(
        6,
        "wrong passwords before the connection is dropped (rejected public keys are not "
        "counted: `login_timeout` bounds them)",
        POSITIVE,
    )
    drain_timeout: float = key(
        60.0,
        "on the first SIGTERM (or SIGINT) the listener closes at once and open sessions may "
        "go on this long (an upload in flight completes; new requests in them still work); "
        "those left are then disconnected, their open uploads journaled `incomplete`. Running "
        "jobs are released at once (ffmpeg stopped, no attempt counted) whatever this is. A "
        "second signal ends the drain at once. Keep the unit's `TimeoutStopSec=` above it. "
        "Reloadable: the value in force when the signal comes counts. 0: disconnect at once",
        NONNEGATIVE,
        unit="seconds",
    )
    umask: int = key(
        0o022,
        "masked off the modes clients ask for when users create files and folders (as "
        "`sftp-server -u`), whatever the process umask: the systemd unit's `UMask=0077` keeps "
        "the state private without making every customer file 0600",
        OCTAL,
    )
    fast_paths: str = key(
        "auto",
        "`auto`: serve's speed-ups that reach into asyncssh's internals (fewer copies of "
        "received bytes, replies written straight to the channel, no MSG_IGNORE before each "
        "packet of a non-CBC cipher) are used when asyncssh is the tested 2.24 line and every "
        "internal they need is found at start; otherwise one warning names what is missing "
        "and every session runs on asyncssh's public API. `off`: always the public API "
        "(same SFTP behaviour, slower: [benchmarks](benchmarks.md#findings))",
        one_of("auto", "off"),
        restart=_SSH,
    )

    max_handles: int = key(
        512,
        "files and folders one SFTP session may hold open at once (OpenSSH's sftp-server: "
        '512); past it OPEN and OPENDIR fail with "too many open handles", journaled. Over '
        "every session together, handles holding a descriptor stop 256 short of the "
        "process's open-files limit, so one session or user cannot take the descriptors "
        "others need",
        POSITIVE,
        restart=_SSH,
    )
    max_upload_size: int = key(
        0,
        "largest file a client may make: a WRITE (or copy-data, or a SETSTAT size) ending past "
        'it fails with "File too large", journaled as `quota_exceeded`, and the upload '
        "starts no job (0: no limit)",
        NONNEGATIVE,
        unit="bytes",
        restart=_SSH,
    )
    quota_bytes: int = key(
        0,
        "bytes of regular files each user may hold in their home, unless `users[].quota_bytes` "
        'says otherwise; a WRITE past it fails with "Quota exceeded" (0: no limit). How usage '
        "is counted, and what it cannot see: [security](security.md#quotas-and-sizes)",
        NONNEGATIVE,
        unit="bytes",
        restart=_SSH,
    )
    quota_files: int = key(
        0,
        "regular files each user may hold, unless `users[].quota_files` says otherwise; "
        'creating one more fails with "Quota exceeded" (0: no limit)',
        NONNEGATIVE,
        restart=_SSH,
    )
    receive_budget: int = key(
        64 * 1024**2,
        "memory for data received but not yet written, over every session: WRITEs answered "
        "and waiting for the disk plus requests waiting in sessions' buffers. While it is "
        "spent, sessions stop reading from their clients (no SSH window is re-opened) until "
        "it drains, so memory stays flat as sessions grow: "
        "[security](security.md#memory-under-overload)",
        POSITIVE,
        unit="bytes",
        restart=_SSH,
    )
    node: str = key(
        socket.gethostname(),
        "this host's name in a cluster: on every session and log line (and, where the "
        "database keeps them, on sessions and jobs), so one journal shows which host served "
        "whom",
        matching(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", "must be a host name", "a host name"),
        restart=_LOG,
        shown="the host name",
    )
    processes: int = key(
        1,
        "gateway processes sharing the port (SO_REUSEPORT; one Python process is about one "
        "core); above 1 a supervisor starts them, restarts one that dies and runs the "
        "embedded workers itself. `auto`: one per core. Door limits count per process: "
        "[deploy](deploy.md#several-processes-on-one-host)",
        Rule("an integer > 0, or `auto`", _processes, accepts=(int, str)),
        restart=_LISTENER,
        shown="`1`",
    )
    proxy_protocol_from: tuple[str, ...] = key(
        (),
        "load balancers whose connections start with a PROXY protocol header (v1 or v2): "
        "the header's source address becomes the session's address (journal, xferlog, "
        "defender, door limits). A connection from these must send one; one from anywhere "
        "else that sends one is refused and scored. The balancers themselves are safelisted "
        "(never scored or banned). Empty: off. [deploy](deploy.md#cluster-load-balancer-shared-"
        "storage-postgresql)",
        Rule(
            "addresses or CIDR networks (`192.0.2.7`, `10.0.0.0/8`, `2001:db8::/32`)",
            lambda value: _networks(value),
        ),
        restart=_LISTENER,
    )
    proxy_protocol_timeout: float = key(
        5.0,
        "seconds a listed load balancer's connection may take to send its whole PROXY header",
        POSITIVE,
        unit="seconds",
        restart=_LISTENER,
    )
    session_sweep: float = key(
        30.0,
        "how often each gateway process heartbeats its row in the journal database and ends "
        "the sessions of gateway processes that died without closing them (also once at "
        "start): [deploy](deploy.md#stop-drain-and-reload)",
        POSITIVE,
        unit="seconds",
        restart=_SWEEP,
    )
    gateway_timeout: float = key(
        120.0,
        "a gateway process of another node (or pid namespace) whose heartbeat is older than "
        "this is taken for dead and its open sessions are ended; keep it well above "
        "`server.session_sweep`. One of this node is judged by /proc (its pid gone), never "
        "by this",
        POSITIVE,
        unit="seconds",
        restart=_SWEEP,
    )


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """The SQLite audit journal of every session and request."""

    enabled: bool = key(True, "`false` journals nothing (for measuring its cost)", restart=_JOURNAL)
    path: Path | None = key(
        None, "the SQLite file", shown="`<state_dir>/journal.sqlite3`", restart=_JOURNAL
    )
    synchronous: str = key(
        "full",
        "`full`: every commit is fsync'd, and an upload that starts a job is fsync'd before the "
        "commit its OK reply waits for; `normal`: nothing is fsync'd, the last commits (and "
        "uploads) may be lost on power loss. Exactly what an OK reply guarantees: "
        "[journal](journal.md#what-an-ok-reply-to-close-guarantees)",
        one_of("full", "normal"),
        restart=_JOURNAL,
    )
    batch_max: int = key(1000, "most events in one commit", POSITIVE, restart=_JOURNAL)
    commit_interval: float = key(
        0.02,
        "time a burst of records gathers before its commit; a completed upload that starts a "
        "job commits at once",
        NONNEGATIVE,
        unit="seconds",
        restart=_JOURNAL,
    )
    durable_timeout: float = key(
        10.0,
        "time a CLOSE (or RENAME) that starts a job waits for its commit; past it the client "
        'gets "upload not recorded, try again" and the journal an error row',
        POSITIVE,
        unit="seconds",
        restart=_JOURNAL,
    )
    retention: float | None = key(
        None,
        "how long journal rows are kept: `sftpgate journal prune` (run it daily from a timer) "
        "removes older sessions, operations, uploads and finished jobs, never a job still "
        "queued or running nor its upload. Unset: kept forever",
        Rule(
            "a duration: `400d`, `12w`, `36h`, or seconds",
            lambda value: _retention(value),
            accepts=(int, float, str),
        ),
        shown="unset",
    )


def _retention(value: float | str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if isinstance(value, str):
        text = value.strip().lower()
        unit = units.get(text[-1:]) if text else None
        try:
            amount = float(text[:-1] if unit else text)
        except ValueError:
            raise Invalid(f"must be a duration like 400d, got {value!r}") from None
        value = amount * (unit or 1)
    if isinstance(value, bool) or not value > 0:
        raise Invalid("must be greater than 0")
    return float(value)


_DATABASE = "the database connections are opened once, at start"


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """Where the journal, job ledger and bans live: SQLite in the state folder by default, or a
    PostgreSQL database shared by several hosts."""

    url: str | None = key(
        None,
        "`postgresql://user:password@host:port/dbname` (libpq's URL or its `sslmode=...` "
        "parameters) to keep the journal, jobs, bans and quota usage in PostgreSQL, and run "
        "the jobs with Procrastinate; unset: SQLite (`journal.path`)",
        matching(r"^postgres(ql)?://", "must be a postgresql:// URL", "a `postgresql://` URL"),
        restart=_DATABASE,
    )
    pool_size: int = key(
        10,
        "most PostgreSQL connections one process holds for sftpgate (Procrastinate's workers "
        "hold up to 4 more)",
        POSITIVE,
        restart=_DATABASE,
    )


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The mail server that sends users' and the admin's emails."""

    host: str = key("localhost", "mail server")
    port: int = key(25, "mail server port", PORT)
    security: str = key("none", "how the connection is secured", one_of("none", "starttls", "tls"))
    username: str | None = key(None, "optional SMTP login")
    password_file: Path | None = key(
        None, "file holding the SMTP password (never written in config.yaml)"
    )
    password_env: str | None = key(
        None, "environment variable holding the SMTP password (never written in config.yaml)"
    )
    sender: str = key("sftpgate@localhost", "sender address", EMAIL, name="from")
    timeout: float = key(30.0, "time per SMTP conversation", POSITIVE, unit="seconds")
    retries: int = key(
        3,
        "transient failures (refused, 4xx) are retried this often, `retry_wait·2ⁿ` s apart; "
        "after that the job step fails and the job is retried with its own backoff. 5xx is "
        "permanent: recorded, never retried",
        NONNEGATIVE,
    )
    retry_wait: float = key(
        2.0, "first wait between SMTP tries, doubled each time", NONNEGATIVE, unit="seconds"
    )


@dataclass(frozen=True, slots=True)
class EmailConfig:
    """The emails users get about their uploads, and the admin about dead jobs."""

    enabled: bool = key(True, "send user emails at all")
    templates_dir: Path | None = key(
        None,
        "folder with `converted.subject/.txt/.html`, `rejected.*`, `refused.*`, `digest.*`, "
        "`dead.*` overriding the built-in templates; placeholders `$name $surname $login $file "
        "$duration $resolution $outputs $reason $job_id $poster $items $count`",
        shown="built-in",
    )
    admin: str | None = key(None, "told when a job goes dead", EMAIL)
    rate_limit: int = key(
        10,
        "emails to one user per `rate_window`; beyond that their notices wait and go out "
        "together as one digest as soon as the window allows one more",
        POSITIVE,
    )
    rate_window: float = key(3600.0, "the sliding window of `rate_limit`", POSITIVE, unit="seconds")


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
PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


def _folder_inside(value: str) -> str:
    value = value.strip("/")
    if not value or ".." in value.split("/"):
        raise Invalid("must be a folder inside the home, without ..")
    return value


INSIDE_HOME = Rule("a folder inside the home, no `..`", _folder_inside)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Which completed uploads start a job, what is accepted, and how ffmpeg converts it."""

    enabled: bool = key(True, "start jobs for completed uploads", restart=_WORKERS_STARTED)
    patterns: tuple[str, ...] = key(
        DEFAULT_PATTERNS, "candidate names (case-insensitive); the content decides"
    )
    temp_patterns: tuple[str, ...] = key(
        DEFAULT_TEMP_PATTERNS, "uploads under these names complete when renamed to a final name"
    )
    output_dir: str = key(
        "converted",
        "folder inside the home for outputs (never overwritten: a later upload of the same "
        "name gets `-1`, `-2` …)",
        INSIDE_HOME,
    )
    allowed_containers: tuple[str, ...] = key(
        DEFAULT_CONTAINERS, "ffprobe format names accepted (`mov`, `avi`, `asf`, `matroska` …)"
    )
    allowed_video_codecs: tuple[str, ...] = key(
        DEFAULT_VIDEO_CODECS, "ffprobe video codec names accepted (`h264`, `mpeg4`, `wmv2` …)"
    )
    max_duration: float = key(4 * 3600.0, "longer inputs are rejected", POSITIVE, unit="seconds")
    max_width: int = key(7680, "wider inputs are rejected", POSITIVE, unit="pixels")
    max_height: int = key(4320, "taller inputs are rejected", POSITIVE, unit="pixels")
    max_size: int = key(50 * 1024**3, "larger inputs are rejected", POSITIVE, unit="bytes")
    thumbnails: int = key(10, "evenly spaced thumbnails", NONNEGATIVE)
    thumbnail_width: int = key(320, "width of each thumbnail", EVEN, unit="pixels")
    poster_width: int = key(640, "width of the one poster (~10% in)", EVEN, unit="pixels")
    crf: int = key(23, "x264 quality of the FLV (lower is better)", NONNEGATIVE)
    preset: str = key("veryfast", "x264 preset of the FLV", one_of(*PRESETS))
    audio_bitrate: str = key("128k", "AAC bitrate of the FLV")
    ffmpeg: str = key("ffmpeg", "the ffmpeg to run (a bare name is looked up in `PATH`)")
    ffprobe: str = key("ffprobe", "the ffprobe to run (a bare name is looked up in `PATH`)")
    timeout: float = key(
        3 * 3600.0,
        "ffmpeg is killed after this; it runs at low priority in its own process group and dies "
        "with the gateway; ffprobe gets 2 min",
        POSITIVE,
        unit="seconds",
    )
    nice: int = key(10, "priority of ffmpeg and ffprobe", NONNEGATIVE)
    memory_limit: int = key(
        4 * 1024**3,
        "address-space limit of ffmpeg and ffprobe; both also get CPU time for their wall time "
        "on every CPU",
        POSITIVE,
        unit="bytes",
    )
    max_output_size: int = key(
        8 * 1024**3,
        "largest file ffmpeg may write (`RLIMIT_FSIZE`): a crafted input cannot fill the disk; "
        "a bigger one fails the job",
        POSITIVE,
        unit="bytes",
    )
    threads: int = key(0, "ffmpeg threads (0: ffmpeg decides)", NONNEGATIVE)
    max_pixels: int = key(
        10**12,
        "work an input may cost, in decoded pixels (width x height x frame rate x duration; "
        "about an hour of 4K at 30 fps); more is rejected before ffmpeg runs",
        POSITIVE,
        unit="pixels",
    )
    max_pixels_per_byte: int = key(
        20_000,
        "work per byte of the upload, for inputs over 10¹⁰ pixels: a small file cannot buy "
        "hours of CPU (an hour of black 4K in 9 MiB is ~80,000; real video ~100-1,000)",
        POSITIVE,
    )
    work_rate: float = key(
        2e7,
        "decoded pixels per second ffmpeg manages at worst: its timeout is "
        "60 s + pixels / this, never more than `timeout`",
        POSITIVE,
        unit="pixels/second",
    )
    input_args: tuple[str, ...] = key(
        (), 'extra ffmpeg input options, e.g. `["-readrate", "1"]` (advanced, for special inputs)'
    )


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """The queue of pipeline jobs and the workers that run them."""

    workers: int = key(
        2,
        "embedded workers in `serve` (0: leave jobs to `sftpgate worker`)",
        NONNEGATIVE,
        restart=_WORKERS,
    )
    max_attempts: int = key(5, "then the job is `dead`", POSITIVE)
    backoff_base: float = key(
        30.0, "wait before retry n: `base·2ⁿ⁻¹`, capped", POSITIVE, unit="seconds"
    )
    backoff_max: float = key(3600.0, "cap of the wait before a retry", POSITIVE, unit="seconds")
    per_user_running: int = key(
        1,
        "jobs of one user running at once; workers take users' jobs round-robin, so one "
        "user's backlog never holds up another's upload",
        POSITIVE,
    )
    per_user_queue: int = key(
        100,
        "queued or running jobs one user may have; an upload beyond that gets a `refused` "
        "job (journaled, the user told once per backlog) and is not converted",
        POSITIVE,
    )
    dedupe_window: float = key(
        3600.0,
        "an upload with the same content (sha256) as one of the same user's within this "
        "window is a duplicate: journaled, not converted again, no email (0: off)",
        NONNEGATIVE,
        unit="seconds",
    )
    lease_seconds: float = key(
        60.0,
        "a worker's lease, renewed by heartbeats",
        POSITIVE,
        unit="seconds",
        restart=_WORKERS,
    )
    poll_interval: float = key(
        1.0,
        "how often idle workers look for due jobs (new uploads wake them at once)",
        POSITIVE,
        unit="seconds",
        restart=_WORKERS,
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging, to stderr (for journald)."""

    level: str = key(
        "info",
        "least severe level logged",
        one_of("debug", "info", "warning", "error"),
        restart=_LOG,
    )
    json: bool = key(False, "one JSON object per log line", restart=_LOG)


# -- metrics (sftpgate/metrics.py, sftpgate/metrics_http.py) -----------------------------------

_METRICS = "the metrics listener is opened once, at start"


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError when it is neither. Pure:
    the one reading of the HTTP listeners' addresses (metrics, admin API)."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(value)
    return host, int(port)


def _metrics_address(value: str) -> str:
    """``host:port`` (``[v6]:port``), or empty for off."""
    if value == "":
        return value
    try:
        split_host_port(value)
    except ValueError:
        raise Invalid(
            f"must be host:port (127.0.0.1:9222, [::1]:9222) or empty, got {value!r}"
        ) from None
    return value


METRICS_ADDRESS = Rule("`host:port`", _metrics_address)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics and health checks over plain HTTP (docs/metrics.md): `/metrics`,
    `/healthz`, `/readyz`. Off unless a `listen` is set; bind it to localhost or a management
    network, never the internet."""

    listen: str | None = key(
        None,
        "`host:port` where `sftpgate serve` serves `/metrics`, `/healthz` and `/readyz` (with "
        "`server.processes` > 1 the supervisor serves the numbers of every process on the host; "
        "port 0: any free port, logged); unset: off",
        METRICS_ADDRESS,
        restart=_METRICS,
    )
    worker_listen: str | None = key(
        None,
        "`host:port` where `sftpgate worker` serves its own `/metrics`, `/healthz` and "
        "`/readyz` (a key of its own, so a worker and a gateway on one host never compete for "
        "one port); unset: off",
        METRICS_ADDRESS,
        restart=_METRICS,
    )
    request_timeout: float = key(
        10.0,
        "a connection to the metrics listener that has not sent a whole request this long "
        "after it opened (or after its last answer) is closed: a slow or idle client holds "
        "nothing for long",
        POSITIVE,
        unit="seconds",
        restart=_METRICS,
    )


@dataclass(frozen=True, slots=True)
class SubsystemConfig:
    """The daemon side of the OpenSSH front door (`sftpgate subsystem`), run inside `serve`."""

    enabled: bool = key(
        False, "run the daemon side in `serve`: a Unix socket for taps", restart=_TAP
    )
    sftp_server: str = key(
        "/usr/lib/openssh/sftp-server", "the real server the tap relays to", restart=_TAP
    )
    socket: Path = key(Path("/run/sftpgate/events.sock"), "where taps report", restart=_TAP)
    spool_dir: Path = key(
        Path("/var/spool/sftpgate"),
        "spool for events the daemon did not acknowledge: world-writable with the sticky bit "
        "(mode 1733, like /tmp), so each user's tap creates its own files there; the daemon "
        "replays and removes them",
        restart=_TAP,
    )
    replay_interval: float = key(
        10.0, "time between spool replays", POSITIVE, unit="seconds", restart=_TAP
    )
    ack_timeout: float = key(
        5.0,
        "how long a tap waits for the last acknowledgements before spooling",
        POSITIVE,
        unit="seconds",
        restart=_TAP,
    )


_DEFENDER = "the defender and its ban table are set up at start"


def _networks(value: tuple[str, ...]) -> tuple[str, ...]:
    import ipaddress

    for index, item in enumerate(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise Invalid(f"not an address or network: {item!r}", at=f"[{index}]") from None
    return value


NETWORKS = Rule(
    "addresses or CIDR networks (`192.0.2.7`, `10.0.0.0/8`, `2001:db8::/32`)", _networks
)


def _max_startups(value: str) -> str:
    parts = value.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise Invalid("must be start:rate:full, e.g. 10:30:100") from None
    if len(numbers) != 3:
        raise Invalid("must be start:rate:full, e.g. 10:30:100")
    start, rate, full = numbers
    if not (0 < start <= full and 0 <= rate <= 100):
        raise Invalid("needs 0 < start ≤ full and a rate of 0-100 (%)")
    return value


def _at_least_one(value: float) -> float:
    if value < 1:
        raise Invalid("must be at least 1")
    return value


AT_LEAST_ONE = Rule("≥ 1", _at_least_one)
MAX_STARTUPS = Rule("`start:rate:full` (OpenSSH's `MaxStartups`)", _max_startups)


@dataclass(frozen=True, slots=True)
class DefenderConfig:
    """Scores addresses for what they do wrong and bans those past a threshold (like SFTPGo's
    defender and OpenSSH's `PerSourcePenalties`). Bans live in the journal database, so they
    survive restarts and are shared by gateways on one database; `sftpgate bans` manages them.
    An IPv6 client is scored and banned by its /64."""

    enabled: bool = key(True, "score and ban addresses", restart=_DEFENDER)
    threshold: int = key(15, "score within `observation_time` that bans an address", POSITIVE)
    observation_time: float = key(
        1800.0, "how long an offence counts towards the score", POSITIVE, unit="seconds"
    )
    score_failed_login: int = key(1, "a wrong password or key of a known user", NONNEGATIVE)
    score_unknown_user: int = key(2, "a login attempt for a user that does not exist", NONNEGATIVE)
    score_no_auth: int = key(
        1,
        "a connection that ends (or times out) before authenticating without trying a "
        "password: scanners, `ssh-keyscan`, TCP health checks (safelist a load balancer's)",
        NONNEGATIVE,
    )
    score_protocol_error: int = key(
        3, "SFTP garbage that ends a session, or an SSH protocol error", NONNEGATIVE
    )
    score_limit: int = key(3, "a connection refused by a limit of `door`", NONNEGATIVE)
    ban_time: float = key(1800.0, "first ban of an address", POSITIVE, unit="seconds")
    ban_time_increment: float = key(
        1.5,
        "each further ban of the same address (within a day of its last) lasts this many "
        "times longer than the one before",
        AT_LEAST_ONE,
    )
    max_ban_time: float = key(86400.0, "longest ban", POSITIVE, unit="seconds")
    safelist: tuple[str, ...] = key(
        ("127.0.0.1", "::1"),
        "never scored nor banned, and not held to the door's per-address caps (its totals and "
        "per-user cap still hold); the default keeps a local proxy or health check from "
        "banning everyone",
        NETWORKS,
    )
    blocklist: tuple[str, ...] = key((), "always refused at connection time", NETWORKS)
    reload_interval: float = key(
        5.0,
        "how often the ban table is re-read (bans made by `sftpgate bans` or another gateway "
        "on the same database take effect within this)",
        POSITIVE,
        unit="seconds",
        restart=_DEFENDER,
    )
    auth_failure_delay: float = key(
        1.0,
        "a failed password waits this long before its answer (the connection's other work goes on)",
        NONNEGATIVE,
        unit="seconds",
    )
    hash_threads: int = key(
        2,
        "threads that verify password hashes (scrypt/bcrypt); attempts are served "
        "round-robin by address",
        POSITIVE,
        restart=_DEFENDER,
    )
    hash_queue_per_address: int = key(
        32,
        "password checks of one address waiting at once (an office behind one NAT address "
        "logs in at the same time); beyond this an attempt fails at once and is scored as a "
        "failed login",
        POSITIVE,
    )


@dataclass(frozen=True, slots=True)
class DoorConfig:
    """Connection limits of `sftpgate serve`. A refusal before authentication closes the
    connection before the SSH handshake; after it, the client gets an SSH disconnect naming
    the limit. Every refusal is journaled (at most a few rows a second, the rest counted) and
    scored by the defender."""

    max_startups: str = key(
        "64:30:256",
        "unauthenticated connections: from `start` on, each new one is dropped with "
        "probability `rate`% rising to 100% at `full`, as OpenSSH's `MaxStartups`; `full` "
        "(and `start`) never more than a quarter of the descriptor limit (256 at 1,024). With "
        "`max_startups_per_address` 8, it takes 8 flooding addresses to make anyone else wait",
        MAX_STARTUPS,
    )
    max_startups_per_address: int = key(
        8, "unauthenticated connections from one address (IPv6: one /64)", POSITIVE
    )
    banner_timeout: float = key(
        10.0,
        "time a new connection has to send its SSH version line (`server.login_timeout` then "
        "bounds the rest of the login)",
        POSITIVE,
        unit="seconds",
    )
    max_sessions_per_user: int = key(64, "authenticated connections of one user", POSITIVE)
    max_sessions_per_address: int = key(
        128, "authenticated connections from one address (IPv6: one /64)", POSITIVE
    )
    max_sessions: int = key(
        0,
        "authenticated connections in all (0: a quarter of the descriptor limit, "
        "`RLIMIT_NOFILE`, so descriptors remain for files and the journal: 256 at 1,024)",
        NONNEGATIVE,
    )
    max_channels: int = key(
        10, "SFTP sessions (channels) on one connection, as OpenSSH's `MaxSessions`", POSITIVE
    )


# What `serve` offers unless `algorithms` says otherwise: no SHA-1 anywhere (key exchange, MACs,
# signatures), no CBC, no 64-bit-tag umac. Each entry is kept only if this asyncssh has it.
# Not offered either, as ssh-audit fails them: the NIST curves (ecdh-sha2-nistp*) and
# diffie-hellman-group-exchange-sha256 (asyncssh grants a client's 1024-bit minimum).
MODERN_KEX = (
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "curve448-sha512",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)
MODERN_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
MODERN_MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "umac-128@openssh.com",
)
MODERN_HOST_KEYS = ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256")


def _supported(kind: str) -> Rule:
    def check(value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise Invalid("must name at least one algorithm")
        # Imported here: `sftpgate subsystem` never reads this section and must not pay for
        # asyncssh.
        from .algorithms import supported

        known = supported(kind)
        for index, name in enumerate(value):
            if name not in known:
                raise Invalid(
                    f"{name!r} is not a {kind} algorithm asyncssh offers "
                    f"(it has: {', '.join(known)})",
                    at=f"[{index}]",
                )
        return value

    return Rule(f"{kind} algorithms asyncssh supports", check)


@dataclass(frozen=True, slots=True)
class AlgorithmsConfig:
    """What `sftpgate serve` offers in the SSH handshake, most preferred first. The defaults
    have no SHA-1 (key exchange, MACs, `ssh-rsa` signatures), no CBC and no `umac-64`;
    naming a list replaces the default (an unknown name is a config error listing the known
    ones). Host key fingerprints (SHA256) are logged at start."""

    kex: tuple[str, ...] = key(MODERN_KEX, "key exchange", _supported("kex"), restart=_SSH)
    ciphers: tuple[str, ...] = key(MODERN_CIPHERS, "encryption", _supported("cipher"), restart=_SSH)
    macs: tuple[str, ...] = key(
        MODERN_MACS,
        "message authentication (unused with the AEAD ciphers, chacha20-poly1305 and GCM)",
        _supported("mac"),
        restart=_SSH,
    )
    host_keys: tuple[str, ...] = key(
        MODERN_HOST_KEYS,
        "host key signature algorithms (also those accepted for users' keys: `ssh-rsa` here "
        "allows SHA-1 signatures)",
        _supported("host key"),
        restart=_SSH,
    )


# -- api (sftpgate/api/) ---------------------------------------------------------------------

_API = "the admin API's listening socket is opened once"
API_ROLES = ("read", "admin")
# sha256:<64 hex>: the hash `sftpgate api token` prints (of a 256-bit random token).
_TOKEN_HASH = r"^sha256:[0-9a-f]{64}$"  # noqa: S105 - a pattern, not a secret


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One entry of `api.tokens`: who may call the admin API, as what."""

    name: str
    hash: str
    role: str


def _api_tokens(value: list[Any]) -> tuple[ApiToken, ...]:
    import re

    tokens: list[ApiToken] = []
    names: set[str] = set()
    hashes: set[str] = set()
    for index, item in enumerate(value):
        at = f"[{index}]"
        if not isinstance(item, Mapping):
            raise Invalid("must be a mapping with name, hash and role", at=at)
        unknown = sorted(set(map(str, item)) - {"name", "hash", "role"})
        if unknown:
            raise Invalid(f"unknown key {unknown[0]!r}", at=at)
        name, hashed, role = item.get("name"), item.get("hash"), item.get("role")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
            raise Invalid("must be 1-64 letters, digits, `_ . @ -`", at=f"{at}.name")
        if name in names:
            raise Invalid(f"duplicate name {name!r}", at=f"{at}.name")
        if not isinstance(hashed, str) or not re.fullmatch(_TOKEN_HASH, hashed):
            raise Invalid(
                "must be sha256:<64 hex digits>, as `sftpgate api token` prints (never the "
                "token itself)",
                at=f"{at}.hash",
            )
        if hashed in hashes:
            raise Invalid("the same hash twice", at=f"{at}.hash")
        if role not in API_ROLES:
            raise Invalid(f"must be one of {', '.join(API_ROLES)}", at=f"{at}.role")
        names.add(name)
        hashes.add(hashed)
        tokens.append(ApiToken(name, hashed, role))
    return tuple(tokens)


API_TOKENS = Rule(
    "a list of `{name, hash, role}`: `hash` as `sftpgate api token` prints it, `role` "
    "`read` or `admin`",
    _api_tokens,
    accepts=(list,),
)


def _host_port(value: str) -> str:
    try:
        split_host_port(value)
    except ValueError:
        raise Invalid(f"must be host:port (127.0.0.1:8022, [::1]:8022), got {value!r}") from None
    return value


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The admin HTTP API (docs/api.md): the journal, sessions, jobs, uploads, users and bans
    over HTTP with bearer tokens, and its OpenAPI document at `/openapi.json`. Off unless
    `listen` is set. It runs in `sftpgate serve` (the supervisor with `server.processes` > 1),
    never in `sftpgate worker`."""

    listen: str | None = key(
        None,
        "`host:port` to serve the API on (plain HTTP: keep it on loopback or behind a TLS "
        "proxy); unset: no API",
        Rule("`host:port`", _host_port),
        restart=_API,
    )
    tokens: tuple[ApiToken, ...] = key(
        (),
        "who may call it: a read token reads, an admin token also acts (disconnect, retry, "
        "cancel, replay, reload, ban); the config holds only each token's hash. Taken by a "
        "reload",
        API_TOKENS,
    )
    max_body: int = key(
        65536,
        "largest request body accepted (larger: 413)",
        POSITIVE,
        unit="bytes",
        restart=_API,
    )
    disconnect_poll: float = key(
        2.0,
        "how often each gateway process looks for sessions an admin asked to disconnect "
        "(in the journal database, so any process on any node acts on it)",
        POSITIVE,
        unit="seconds",
        restart=_API,
    )


def _password_hash(value: str) -> str:
    # Imported here: importing passwords computes its dummy hash (scrypt, ~0.1 s).
    from .passwords import check_hash_format

    problem = check_hash_format(value)
    if problem:
        raise Invalid(problem)
    return value


def _authorized_keys(value: list[Any] | str) -> tuple[str, ...]:
    lines = [value] if isinstance(value, str) else value
    if not lines:
        return ()
    # Imported here: `sftpgate subsystem` loads a config without keys for every
    # OpenSSH session and must not pay for asyncssh (~0.1 s).
    import asyncssh

    keys: list[str] = []
    for index, line in enumerate(lines):
        if not isinstance(line, str):
            raise Invalid(
                "must be a string (one OpenSSH public key line, no options)", at=f"[{index}]"
            )
        try:
            asyncssh.import_public_key(line)
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise Invalid(f"not an OpenSSH public key: {exc}", at=f"[{index}]") from None
        keys.append(line.strip())
    return tuple(keys)


PASSWORD_HASH = Rule(
    "scrypt (`sftpgate users hash-password`) or bcrypt (`htpasswd -nB`)", _password_hash
)
OPENSSH_KEYS = Rule(
    "OpenSSH public key lines (one key each, no options); one may be a plain string",
    _authorized_keys,
    accepts=(list, str),
)


@dataclass(frozen=True, slots=True)
class User:
    """One entry of `users:`. A user logs in to `serve` with a `password_hash` or
    `authorized_keys` (or both); one with neither is an OpenSSH-only user
    (`sftpgate subsystem`)."""

    login: str = field(metadata=required("the login name", LOGIN))
    name: str = field(metadata=required("first name, for emails"))
    surname: str = field(metadata=required("surname, for emails"))
    email: str = field(metadata=required("receives pipeline notices", EMAIL))
    home: Path = field(metadata=required("the user's home, seen by them as `/`"))
    password_hash: str | None = key(None, "the password's hash", PASSWORD_HASH)
    authorized_keys: tuple[str, ...] = key((), "public keys the user may log in with", OPENSSH_KEYS)
    uid: int | None = key(
        None,
        "when the gateway runs as root, who this user's file work (and pipeline) runs as; its "
        "supplementary groups come with it when a system account has that uid. A user resolved "
        "to root (a root-owned home, no account) is logged as a warning: the kernel then "
        "confines nothing",
        shown="the system account of the same login, else the home's owner",
    )
    gid: int | None = key(
        None,
        "the primary group of that file work",
        shown="`uid` when that is set, else the system account's group, else the home's group",
    )
    quota_bytes: int | None = key(
        None,
        "bytes of regular files this user may hold (0: no limit)",
        NONNEGATIVE,
        unit="bytes",
        shown="as `server.quota_bytes`",
    )
    quota_files: int | None = key(
        None,
        "regular files this user may hold (0: no limit)",
        NONNEGATIVE,
        shown="as `server.quota_files`",
    )


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    email: EmailConfig = field(default_factory=EmailConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    subsystem: SubsystemConfig = field(default_factory=SubsystemConfig)
    defender: DefenderConfig = field(default_factory=DefenderConfig)
    door: DoorConfig = field(default_factory=DoorConfig)
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    users: tuple[User, ...] = field(default_factory=tuple)

    @property
    def journal_path(self) -> Path:
        return self.journal.path or self.server.state_dir / "journal.sqlite3"

    def user(self, login: str) -> User | None:
        for user in self.users:
            if user.login == login:
                return user
        return None


# The sections of config.yaml: each field of Config whose type is a section class.
SECTIONS: dict[str, type[Any]] = {
    name: hint
    for name, hint in typing.get_type_hints(Config).items()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint)
}


def _section(source: Source, raw: Mapping[str, Any], name: str) -> Any:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise source.error(name, "must be a mapping")
    return read(SECTIONS[name], value, source, name)


def _users(source: Source, raw: Mapping[str, Any]) -> tuple[User, ...]:
    value = raw.get("users") or []
    if not isinstance(value, list):
        raise source.error("users", "must be a list")
    users: list[User] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        where = f"users[{index}]"
        if not isinstance(item, Mapping):
            raise source.error(where, "must be a mapping")
        user = read(User, item, source, where)
        if user.login in seen:
            raise source.error(f"{where}.login", f"duplicate login {user.login!r}")
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
    for name in raw:
        if name not in SECTIONS and name != "users":
            raise ConfigError(f"{file}: {name}: unknown key")
    source = Source(file, config_path.parent)
    sections = {name: _section(source, raw, name) for name in SECTIONS}
    server = sections["server"]
    if server.gateway_timeout < 2 * server.session_sweep:
        # Else a live node, between two heartbeats, would be taken for dead.
        raise source.error(
            "server.gateway_timeout",
            f"must be at least twice server.session_sweep ({server.session_sweep:g} s)",
        )
    return Config(path=config_path, users=_users(source, raw), **sections)


# (key, section, attribute) of what ``sftpgate serve`` reads only once, at start:
# the keys declared with ``restart=``. A reload (SIGHUP) that changes any of
# them is refused whole; every other key is swapped in together.
_RESTART = tuple(
    (f"{section}.{yaml_name(f)}", section, f.name)
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if spec_of(f).restart
)
RESTART_KEYS = tuple(name for name, _, _ in _RESTART)


def restart_keys_changed(old: Config, new: Config) -> list[str]:
    """The keys of :data:`RESTART_KEYS` whose values differ between ``old`` and ``new``. Pure."""
    return [
        name
        for name, section, attribute in _RESTART
        if getattr(getattr(old, section), attribute) != getattr(getattr(new, section), attribute)
    ]


def reference_markdown() -> str:
    """The key reference of ``docs/configuration.md``, from the declarations above."""
    lines = ["## Keys", ""]
    for name, cls in SECTIONS.items():
        lines += section_markdown(name, cls)
    lines += section_markdown("users[]", User)
    lines += ["## Keys that need a restart", ""]
    lines += [
        "A reload (`SIGHUP`) that changes one of these is refused whole; every other key is "
        "taken by it.",
        "",
    ]
    lines += restart_markdown(SECTIONS)
    return "\n".join(lines)


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
