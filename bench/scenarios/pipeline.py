"""Figure 8: the whole video pipeline against a bare ffmpeg FLV transcode of the same clip.

- The clip: made once with ffmpeg's lavfi sources (``testsrc2`` at 25 fps +
  a 440 Hz ``sine``), H.264 (libx264 veryfast, yuv420p) + AAC in MP4,
  ``options.clip_seconds`` long at ``options.clip_size``.
- A (sftpgate): an extra gateway with the pipeline on (default
  ``PipelineConfig``: 10 thumbnails, poster, veryfast/crf 23), one embedded
  worker polling every 50 ms, and a real SMTP server (aiosmtpd, from the test
  suite's ``pipeline_kit``). Each round uploads the clip over SFTP (paramiko,
  Ed25519 key) as ``clipN.mp4``; the clock starts at ``time.time()`` right
  after the CLOSE reply (``put(confirm=False)`` returns) and stops at the job
  row's ``finished_at`` (the gateway's ``time.time()``; same machine clock),
  which the client polls for every 20 ms. That covers job pick-up, probe
  (ffprobe + validate), the one ffmpeg pass writing FLV + poster + thumbnails,
  the JSON sidecar (sha256 of the upload, ffprobe of the FLV, keyframe index)
  and the email. Each round checks that the email arrived and the FLV exists.
- B (bare ffmpeg): only the FLV output of that pass, as a plain subprocess
  (``bare_argv``): same input, the same square-pixel/even-size scale filter,
  libx264 with the default preset/crf, yuv420p, AAC at the default bitrate,
  ``-f flv -flvflags add_keyframe_index``, to a temporary file on the same
  filesystem (the keyframe index is written by rewriting the file at the end,
  so /dev/null would skip work the pipeline does), not niced.

Value: median(A) / median(B), interleaved (A B, B A, ...) with a warm-up. ``extra``
also holds where A's time goes (from the job row's ``steps`` timestamps) and
the CPU seconds of each ffmpeg (B exactly from rusage; A's sampled from
/proc while the job runs, so a lower bound by up to one poll interval).
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from sftpgate.config import PipelineConfig
from sftpgate.media.probe import file_url

from ..common import Figure, Options, interleave, median
from ..servers import Servers, extra_gateway

# bench/servers.py has put tests/ on sys.path (for sshd_kit); the SMTP server is the suite's
from pipeline_kit import SmtpServer  # isort: skip

POLL = 0.02  # seconds between job-row polls
FINISHED = ("succeeded", "failed", "dead", "cancelled")
CLIP_NAME = "clip.mp4"
SENDER = "bench@localhost"


@dataclass
class Round:
    """One A run: client timestamps, the finished job row, and what was checked."""

    name: str
    closed: float  # client time.time() right after the CLOSE reply
    seen: float  # client time.time() when the poll saw the job finished
    row: dict[str, Any]
    ffmpeg_cpu: float  # seconds, sampled from /proc (lower bound)
    steps: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(self.row["finished_at"]) - self.closed

    def phases(self) -> dict[str, float]:
        """Seconds spent in each part of the job, from the job row's timestamps."""
        s = self.steps
        probe, transcode, sidecar = s["probe"], s["transcode"], s["sidecar"]
        out = {
            "pickup": probe["started"] - self.closed,  # close -> commit -> lease -> first step
            "probe": probe["finished"] - probe["started"],
            "transcode": transcode["finished"] - transcode["started"],
            "sidecar": sidecar["finished"] - sidecar["started"],
            "email+finish": float(self.row["finished_at"]) - sidecar["finished"],
        }
        out["between steps"] = self.total - sum(out.values())
        out["lease"] = float(self.row["started_at"]) - self.closed
        return out


def make_clip(path: Path, seconds: int, size: str) -> Path:
    """A ``seconds``-long H.264 + AAC MP4 (test pattern + tone) at ``size``."""
    argv = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-t", str(seconds), "-f", "mp4", file_url(path),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg could not make the clip: {done.stderr.strip()}")
    return path


def bare_argv(src: Path, out: Path, cfg: PipelineConfig) -> list[str]:
    """B: the FLV output of ``plan_convert``'s pass alone (clip with audio and video)."""
    argv = [
        cfg.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        *cfg.input_args, "-i", file_url(src),
        "-map", "0:V:0", "-map", "0:a:0?",
        "-vf", "scale=trunc(iw*sar/2)*2:trunc(ih/2)*2,setsar=1",
        "-c:v", "libx264", "-preset", cfg.preset, "-crf", str(cfg.crf), "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", cfg.audio_bitrate,
    ]  # fmt: skip
    if cfg.threads > 0:
        argv += ["-threads", str(cfg.threads)]
    return [*argv, "-f", "flv", "-flvflags", "add_keyframe_index", file_url(out)]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _proc_cpu(pid: int) -> float | None:
    """utime + stime of a running process in seconds, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_job(db: sqlite3.Connection, path: str, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll until the job for ``path`` is finished; return its row and the ffmpeg CPU seen."""
    deadline = time.monotonic() + timeout
    cpu: dict[int, float] = {}
    while True:
        row = db.execute("SELECT * FROM jobs WHERE path = ? ORDER BY id DESC", (path,)).fetchone()
        if row is not None:
            if row["state"] in FINISHED:
                return dict(row), sum(cpu.values())
            if row["pid"]:
                used = _proc_cpu(int(row["pid"]))
                if used is not None:
                    cpu[int(row["pid"])] = used
        if time.monotonic() > deadline:
            state = None if row is None else row["state"]
            raise TimeoutError(f"job for {path} not finished after {timeout:.0f} s ({state})")
        time.sleep(POLL)


class PipelineRunner:
    """A's rounds: upload, wait for the job, check the outputs."""

    def __init__(
        self,
        servers: Servers,
        port: int,
        home: Path,
        journal: Path,
        clip: Path,
        smtp: SmtpServer,
        cfg: PipelineConfig,
        timeout: float,
    ) -> None:
        self.clip, self.home, self.journal, self.smtp = clip, home, journal, smtp
        self.cfg, self.timeout = cfg, timeout
        self.rounds: list[Round] = []
        key = paramiko.Ed25519Key.from_private_key_file(str(servers.key))
        self.transport = paramiko.Transport(("127.0.0.1", port))
        self.transport.connect(username=servers.login, pkey=key)
        sftp = paramiko.SFTPClient.from_transport(self.transport)
        assert sftp is not None
        self.sftp = sftp
        self.db: sqlite3.Connection | None = None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.sftp.close()
        self.transport.close()

    def __call__(self) -> float:
        name = f"clip{len(self.rounds) + 1}.mp4"
        emails = len(self.smtp.inbox.messages)
        self.sftp.put(str(self.clip), name, confirm=False)  # returns on the CLOSE reply
        closed = time.time()
        if self.db is None:  # the gateway made the journal at start-up
            self.db = sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True, timeout=10)
            self.db.row_factory = sqlite3.Row
        row, cpu = _wait_job(self.db, f"/{name}", self.timeout)
        seen = time.time()
        if row["state"] != "succeeded" or row["outcome"] != "converted":
            raise RuntimeError(f"{name}: job {row['state']}/{row['outcome']}: {row['last_error']}")
        flv = self.home / self.cfg.output_dir / (Path(name).stem + ".flv")
        if not flv.is_file() or flv.stat().st_size == 0:
            raise RuntimeError(f"{name}: no FLV at {flv}")
        if len(self.smtp.inbox.messages) != emails + 1:
            raise RuntimeError(f"{name}: {len(self.smtp.inbox.messages) - emails} emails, not 1")
        done = Round(name, closed, seen, row, cpu, json.loads(row["steps"]))
        self.rounds.append(done)
        return done.total


class BareRunner:
    """B's rounds: the FLV transcode alone, timed as a subprocess."""

    def __init__(self, clip: Path, folder: Path, cfg: PipelineConfig, timeout: float) -> None:
        self.out = folder / "bare.flv"
        self.argv = bare_argv(clip, self.out, cfg)
        self.timeout = timeout
        self.cpu: list[float] = []

    def __call__(self) -> float:
        cpu = _children_cpu()
        start = time.perf_counter()
        done = subprocess.run(
            self.argv, capture_output=True, text=True, check=False, timeout=self.timeout
        )
        elapsed = time.perf_counter() - start
        self.cpu.append(_children_cpu() - cpu)
        if done.returncode != 0 or not self.out.is_file():
            raise RuntimeError(f"bare ffmpeg failed: {done.stderr.strip()}")
        self.out.unlink()
        return elapsed


def _med(values: list[float]) -> float:
    return median(values) if values else float("nan")


def run(servers: Servers, options: Options) -> list[Figure]:
    cfg = PipelineConfig()  # A runs with these defaults; B copies its settings from them
    folder = servers.workdir / "figure8"
    folder.mkdir()
    clip = make_clip(folder / CLIP_NAME, options.clip_seconds, options.clip_size)
    timeout = max(120.0, 30.0 * options.clip_seconds)
    load_before = os.getloadavg()[0]
    smtp = SmtpServer().start()
    try:
        sections = {
            "pipeline": {"enabled": True},
            "jobs": {"workers": 1, "poll_interval": 0.05},
            "smtp": {"host": "127.0.0.1", "port": smtp.port, "from": SENDER},
        }
        with extra_gateway(servers, "pipeline", **sections) as gateway:
            journal = servers.workdir / "pipeline" / "state" / "journal.sqlite3"
            a = PipelineRunner(
                servers, gateway.port, gateway.home, journal, clip, smtp, cfg, timeout
            )
            b = BareRunner(clip, folder, cfg, timeout)
            try:
                times_a, times_b = interleave(a, b, rounds=options.rounds, warmup=options.warmup)
            finally:
                a.close()
            flvs = sorted(p.name for p in (gateway.home / cfg.output_dir).glob("*.flv"))
        emails = len(smtp.inbox.messages)
    finally:
        smtp.stop()

    kept = a.rounds[options.warmup :]
    med_a, med_b = median(times_a), median(times_b)
    phases = {key: _med([r.phases()[key] for r in kept]) for key in kept[0].phases()}
    cpu_a = _med([r.ffmpeg_cpu for r in kept])
    cpu_b = _med(b.cpu[options.warmup :])
    breakdown = ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if k != "lease")
    return [
        Figure(
            number=8,
            title=(
                f"video pipeline ({options.clip_seconds} s {options.clip_size} upload: probe + "
                "one-pass FLV/poster/thumbnails + sidecar + email) vs bare ffmpeg FLV transcode"
            ),
            measured=(
                f"{med_a:.2f} vs {med_b:.2f} s (A: {breakdown} s; "
                f"ffmpeg CPU {cpu_a:.1f} vs {cpu_b:.1f} s)"
            ),
            value=med_a / med_b,
            target="<= 1.05",
            notes=(
                "A: an extra gateway, pipeline defaults (10 thumbnails, 640 px poster, libx264 "
                f"{cfg.preset}/crf {cfg.crf}, AAC {cfg.audio_bitrate}), 1 worker polling every "
                "50 ms, a real SMTP server (aiosmtpd); the clip is uploaded with paramiko as "
                "clipN.mp4 and timed from the client's time.time() right after the CLOSE reply "
                "to the job row's finished_at (gateway clock, same machine; the client polls "
                "the row every 20 ms); each round checks the email and the FLV. "
                "B: `ffmpeg -i clip -map 0:V:0 -map 0:a:0? -vf "
                "scale=trunc(iw*sar/2)*2:trunc(ih/2)*2,setsar=1 -c:v libx264 -preset "
                f"{cfg.preset} -crf {cfg.crf} -pix_fmt yuv420p -c:a aac -b:a {cfg.audio_bitrate} "
                "-f flv -flvflags add_keyframe_index out.flv`, i.e. only the FLV output of the "
                "pipeline's ffmpeg pass, settings from PipelineConfig(), writing a temp file on "
                "the same filesystem, not niced (the pipeline's ffmpeg runs at nice 10), timed as "
                "a subprocess. The A breakdown comes from the job row's step timestamps (pickup = "
                "CLOSE reply to the probe step starting). ffmpeg CPU: B from rusage, A sampled "
                "from /proc every 20 ms (a slight undercount)."
            ),
            extra={
                "a_seconds": times_a,
                "b_seconds": times_b,
                "a_phases_median": phases,
                "a_phases": [r.phases() for r in kept],
                "a_ffmpeg_cpu": [r.ffmpeg_cpu for r in kept],
                "b_ffmpeg_cpu": b.cpu[options.warmup :],
                "a_seen_minus_finished": [r.seen - float(r.row["finished_at"]) for r in kept],
                "emails": emails,
                "flvs": flvs,
                "jobs": len(a.rounds),
                "clip_bytes": clip.stat().st_size,
                # other work on the machine skews A more than B: A's ffmpeg runs at nice 10
                "loadavg_1min": [load_before, os.getloadavg()[0]],
                "bare_argv": b.argv,
            },
        )
    ]
