"""The steps a completed video upload goes through, each idempotent.

probe (+ validate) → transcode (one ffmpeg pass: FLV + poster + thumbnails)
→ sidecar JSON → email. A finished step leaves a marker on the job row and is
skipped when the job runs again after a crash or a retry. Outputs are written
under temporary names and renamed into place; their final names are chosen
once, stored on the job, and reused by every later attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import metrics
from .beneath import Home
from .config import Config, User
from .errors import SftpgateError
from .identity import Identity, IdentityError, call_as, identity_for
from .jobs.model import EmailState, Job, Outcome
from .jobs.store import JobStore
from .media import MediaError
from .media.facts import MediaFacts
from .media.files import (
    Refused,
    create_temp,
    open_output,
    open_output_folder,
    open_upload,
    place,
    read_output,
    taken,
    write_all,
)
from .media.flv import keyframe_count
from .media.plan import plan_convert
from .media.probe import fd_path, probe
from .media.run import run_ffmpeg
from .media.sandbox import SNIFF_BYTES, sniff
from .media.sidecar import build_sidecar, sha256_file
from .media.validate import validate, work_timeout
from .notify import PermanentEmailError, TransientEmailError
from .notify.message import Poster, build_message
from .notify.smtp import send
from .notify.templates import format_duration, render

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_TIMEOUT = 120.0  # seconds for one ffprobe run
POSTER_LIMIT = 16 * 1024 * 1024  # bytes of the poster read for the email


class PermanentJobError(SftpgateError):
    """Retrying will not help (the upload is gone, the user was removed, 5xx from SMTP)."""


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    output: str | None  # the FLV as the user sees it, for the journal
    message: str
    warning: str | None = None


def choose_outputs(folder_fd: int, stem: str, thumbnails: int) -> dict[str, Any]:
    """Pick output names that nothing in the folder uses yet (suffix -1, -2 ...). Blocking.

    Looks through ``folder_fd`` (a link, even a dangling one, takes a name);
    run it as the uploader.
    """
    for n in range(10_000):
        base = stem if n == 0 else f"{stem}-{n}"
        names: dict[str, Any] = {
            "base": base,
            "flv": f"{base}.flv",
            "sidecar": f"{base}.json",
            "poster": f"{base}-poster.jpg",
            "thumbnails": [f"{base}-thumb-{i:02d}.jpg" for i in range(1, thumbnails + 1)],
        }
        every = [names["flv"], names["sidecar"], names["poster"], *names["thumbnails"]]
        if not any(taken(folder_fd, name) for name in every):
            return names
    raise PermanentJobError(f"no free output name for {stem!r}")


class _AsUser:
    """One run's file work as the uploader: the home, the output folder's descriptor."""

    def __init__(
        self, identity: Identity | None, home: Home, output_dir: str, umask: int = 0o022
    ) -> None:
        self.identity = identity
        self.home = home
        self.output_dir = output_dir
        # Modes of what the pipeline makes for the user, as if the user made
        # them over SFTP (server.umask), whatever the process umask.
        self.file_mode = 0o666 & ~umask
        self.folder_mode = 0o777 & ~umask
        self._folder: int | None = None

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread acting as the user."""
        return await asyncio.to_thread(call_as, self.identity, fn, *args)

    async def open_home(self) -> None:
        """Open the home's descriptor as the user: everything else is reached from it."""
        try:
            await self(lambda: self.home.fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR):
                raise
            who = self.identity.describe() if self.identity else "the gateway"
            why = f"cannot open the home {self.home.path} as {who}: {exc.strerror}"
            raise Refused(why) from None

    async def folder(self) -> int:
        """The output folder's descriptor, opened (or made) once per run."""
        if self._folder is None:
            self._folder = await self(
                open_output_folder, self.home, self.output_dir, self.folder_mode
            )
        return self._folder

    def close(self) -> None:
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None
        self.home.close()


# Email states in which the job sends nothing itself.
_NO_EMAIL = (EmailState.SENT, EmailState.FAILED, EmailState.DIGEST, EmailState.SKIPPED)


def _unlink_at(folder_fd: int, name: str) -> None:
    """Remove one of the job's own temporary names from the folder (never follows a link)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=folder_fd)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Pipeline:
    """Runs one job's steps. The worker pool owns leasing, heartbeats and outcomes."""

    def __init__(
        self, config: Config, store: JobStore, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.store = store
        # The time of the email rate limit and of "same content again" windows.
        self.clock = clock

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.store.executor, lambda: fn(*args, **kwargs))

    async def run(self, job: Job, owner: str, progress: Callable[[float, str], None]) -> Result:
        """Run the steps still to do; raise PermanentJobError or anything else (= retry).

        Every file the job touches is reached as the uploader, beneath the
        home, on descriptors (see ``media.files``); ffprobe and ffmpeg run as
        the uploader too, boxed (``media.sandbox``).
        """
        user = self.config.user(job.login)
        if user is None:
            raise PermanentJobError(f"user {job.login!r} is no longer in the config")
        try:
            identity = await asyncio.to_thread(
                identity_for, user.login, user.home, user.uid, user.gid
            )
        except IdentityError as exc:
            raise PermanentJobError(str(exc)) from None
        files = _AsUser(
            identity,
            Home(user.home),
            self.config.pipeline.output_dir,
            self.config.server.umask,
        )
        try:
            await files.open_home()
            return await self._steps(job, owner, user, files, progress)
        except Refused as exc:
            raise PermanentJobError(str(exc)) from None
        finally:
            await asyncio.to_thread(files.close)

    async def _steps(
        self,
        job: Job,
        owner: str,
        user: User,
        files: _AsUser,
        progress: Callable[[float, str], None],
    ) -> Result:
        if job.outcome == Outcome.REFUSED.value:  # over jobs.per_user_queue
            refused = str(job.data.get("refused") or "too many uploads waiting")
            with metrics.step_timer("email"):
                warning = await self._email(job, owner, user, refused, files, kind="refused")
            return Result(Outcome.REFUSED, None, refused, warning)
        if not job.done("probe"):
            progress(0.0, "probe")
            with metrics.step_timer("probe"):
                job = await self._probe(job, owner, files)
        if "duplicate_of" in job.data:
            await self._db(self.store.set_email_state, job.id, owner, EmailState.SKIPPED)
            first = job.data["duplicate_of"]
            message = (
                f"same content as {first['path']} (job {first['id']}) within "
                "jobs.dedupe_window: not converted again, no email"
            )
            return Result(Outcome.DUPLICATE, first.get("flv"), message)
        reason = job.data.get("rejected")
        if reason is None:
            if not job.done("transcode"):
                with metrics.step_timer("transcode"):
                    job = await self._transcode(job, owner, files, progress)
            if not job.done("sidecar"):
                progress(0.95, "sidecar")
                with metrics.step_timer("sidecar"):
                    job = await self._sidecar(job, owner, user, files)
        progress(0.98, "email")
        with metrics.step_timer("email"):
            warning = await self._email(job, owner, user, reason, files)
        outputs = job.data.get("outputs", {})
        if reason is not None:
            return Result(Outcome.REJECTED, None, reason, warning)
        flv = posixpath.join("/", self.config.pipeline.output_dir, outputs["flv"])
        return Result(Outcome.CONVERTED, flv, "converted", warning)

    async def _open_upload(
        self, job: Job, owner: str, step: str, files: _AsUser
    ) -> tuple[int, Job]:
        """The upload, opened once for ``step``; its inode is recorded at the first open."""
        data = job.data
        expect = (data["device"], data["inode"]) if "inode" in data else None
        fd, device, inode = await files(open_upload, files.home, job.path, expect)
        update = {"device": device, "inode": inode} if expect is None else None
        try:
            job = await self._db(self.store.mark_step, job.id, owner, step, data=update)
        except BaseException:
            _close(fd)
            raise
        return fd, job

    async def _probe(self, job: Job, owner: str, files: _AsUser) -> Job:
        cfg = self.config.pipeline
        fd, job = await self._open_upload(job, owner, "probe", files)
        try:
            reason = sniff(await asyncio.to_thread(os.pread, fd, SNIFF_BYTES, 0))
            if reason is not None:
                raise MediaError(reason)
            data = await asyncio.to_thread(
                probe,
                fd,
                cfg.ffprobe,
                PROBE_TIMEOUT,
                containers=cfg.allowed_containers,
                identity=files.identity,
                nice=cfg.nice,
                memory_limit=cfg.memory_limit,
            )
            facts = MediaFacts.from_probe(data)
            reason = validate(facts, cfg)
            update: dict[str, Any] = {"source": facts.to_dict()}
            if reason is not None:
                update["rejected"] = reason
            elif self.config.jobs.dedupe_window > 0:
                update.update(await self._same_content(job, owner, fd))
        except MediaError as exc:
            return await self._db(
                self.store.mark_step,
                job.id,
                owner,
                "probe",
                finished=True,
                data={"rejected": exc.reason},
            )
        finally:
            _close(fd)
        return await self._db(
            self.store.mark_step, job.id, owner, "probe", finished=True, data=update
        )

    async def _same_content(self, job: Job, owner: str, fd: int) -> dict[str, Any]:
        """Hash the upload (once: the sidecar reuses it); name the job it repeats, if any."""
        digest = await asyncio.to_thread(sha256_file, fd)
        first = await self._db(
            self.store.claim_content,
            job,
            owner,
            digest,
            self.config.jobs.dedupe_window,
            self.clock(),
        )
        if first is None:
            return {"sha256": digest}
        outputs = first.data.get("outputs") or {}
        flv = (
            posixpath.join("/", self.config.pipeline.output_dir, outputs["flv"])
            if outputs.get("flv")
            else None
        )
        log.info("job %d: same content as job %d (%s)", job.id, first.id, first.path)
        return {"duplicate_of": {"id": first.id, "path": first.path, "flv": flv}}

    async def _transcode(
        self,
        job: Job,
        owner: str,
        files: _AsUser,
        progress: Callable[[float, str], None],
    ) -> Job:
        cfg = self.config.pipeline
        src, job = await self._open_upload(job, owner, "transcode", files)
        made: list[int] = []
        try:
            folder = await files.folder()
            # Chosen once; later attempts reuse them ("outputs" then loses the
            # images ffmpeg leaves empty, "planned" keeps them all).
            names: dict[str, Any] | None = job.data.get("planned") or job.data.get("outputs")
            if names is None:
                stem = posixpath.splitext(posixpath.basename(job.path))[0] or "video"
                names = await files(choose_outputs, folder, stem, cfg.thumbnails)
                job = await self._db(
                    self.store.mark_step,
                    job.id,
                    owner,
                    "transcode",
                    data={"outputs": names, "planned": names},
                )
            finals = [names["flv"], names["poster"], *names["thumbnails"]]
            temps = [f".part-{job.id}-{name}" for name in finals]
            for name in temps:
                made.append(await files(create_temp, folder, name, files.file_mode))
            paths = [fd_path(fd) for fd in made]
            facts = MediaFacts(**job.data["source"])
            argv = plan_convert(fd_path(src), paths[0], paths[1], paths[2:], facts, cfg)
            marker = f"ffmpeg:sftpgate-job-{job.id}-{secrets.token_hex(4)}"
            pending: list[asyncio.Task[None]] = []

            def started(pid: int) -> None:
                # Recorded at once so that after a crash the restart can kill it.
                pending.append(
                    asyncio.get_running_loop().create_task(
                        self._db(self.store.set_pid, job.id, owner, pid, marker)
                    )
                )

            timeout = work_timeout(facts, cfg)
            await run_ffmpeg(
                argv,
                timeout=timeout,
                nice=cfg.nice,
                memory_limit=cfg.memory_limit,
                duration=facts.duration,
                on_progress=lambda f: progress(0.05 + 0.9 * f, "transcode"),
                on_start=started,
                identity=files.identity,
                file_size_limit=cfg.max_output_size,
                pass_fds=[src, *made],
                marker=marker,
            )
            await asyncio.gather(*pending)
            await self._db(self.store.set_pid, job.id, owner, None, None)
            stats = [await asyncio.to_thread(os.fstat, fd) for fd in made]
            if stats[0].st_size == 0:
                raise PermanentJobError("ffmpeg wrote no video: the upload has no frame to convert")
            # An image ffmpeg left empty (a stream that ends before it says) is
            # dropped, not retried: another run would leave it empty again.
            kept = [i for i, st in enumerate(stats) if st.st_size > 0]
            for i in range(len(finals)):
                if i not in kept:
                    log.warning("job %d: ffmpeg wrote nothing for %s; left out", job.id, finals[i])
                    await files(_unlink_at, folder, temps[i])
            names = self._kept(names, [finals[i] for i in kept])
            digest = str(job.data.get("sha256") or "") or await asyncio.to_thread(sha256_file, src)
            placed = self._placed(job, [finals[i] for i in kept], [stats[i] for i in kept])
            job = await self._db(
                self.store.mark_step,
                job.id,
                owner,
                "transcode",
                data={"sha256": digest, "placed": placed, "outputs": names},
            )
            moves = [(temps[i], finals[i]) for i in kept]
            await files(place, folder, moves, placed)
        except MediaError as exc:
            if exc.transient:
                raise
            # ffmpeg's verdict on this input (an error exit, or more time than
            # its work allows): another attempt would end the same way.
            raise PermanentJobError(f"cannot convert: {exc.reason}") from None
        finally:
            _close(src, *made)
        return await self._db(self.store.mark_step, job.id, owner, "transcode", finished=True)

    @staticmethod
    def _kept(names: dict[str, Any], written: list[str]) -> dict[str, Any]:
        """The output names with the images ffmpeg left empty taken out."""
        kept = dict(names)
        if kept.get("poster") not in written:
            kept["poster"] = None
        kept["thumbnails"] = [name for name in names.get("thumbnails", []) if name in written]
        return kept

    @staticmethod
    def _placed(
        job: Job, finals: list[str], stats: list[os.stat_result]
    ) -> dict[str, list[list[int]]]:
        """The job's record of which files it puts at which final names, with these added."""
        placed: dict[str, list[list[int]]] = {
            name: [list(pair) for pair in pairs]
            for name, pairs in job.data.get("placed", {}).items()
        }
        for name, st in zip(finals, stats, strict=True):
            placed.setdefault(name, []).append([st.st_dev, st.st_ino])
        return placed

    async def _sidecar(self, job: Job, owner: str, user: User, files: _AsUser) -> Job:
        cfg = self.config.pipeline
        names = job.data["outputs"]
        await self._db(self.store.mark_step, job.id, owner, "sidecar")
        folder = await files.folder()
        digest = str(job.data.get("sha256") or "")
        if not digest:  # transcoded by an older version
            src, job = await self._open_upload(job, owner, "sidecar", files)
            try:
                digest = await asyncio.to_thread(sha256_file, src)
            finally:
                _close(src)
        flv = await files(open_output, folder, names["flv"])
        try:
            report = await asyncio.to_thread(
                probe,
                flv,
                cfg.ffprobe,
                PROBE_TIMEOUT,
                containers=("flv",),
                identity=files.identity,
                nice=cfg.nice,
                memory_limit=cfg.memory_limit,
            )
            keyframes = await asyncio.to_thread(keyframe_count, flv)
        finally:
            _close(flv)
        out = MediaFacts.from_probe(report)
        uploaded = await self._db(self.store.upload_time, job.upload_id)
        sidecar = build_sidecar(
            MediaFacts(**job.data["source"]),
            job.path,
            digest,
            {"login": user.login, "name": user.name, "surname": user.surname, "email": user.email},
            uploaded if uploaded is not None else job.created_at,
            out,
            names["flv"],
            keyframes,
            names.get("poster"),
            list(names["thumbnails"]),
        )
        text = (json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n").encode()
        tmp = f".part-{job.id}-{names['sidecar']}"
        fd = await files(create_temp, folder, tmp, files.file_mode)
        try:
            await asyncio.to_thread(write_all, fd, text)
            st = await asyncio.to_thread(os.fstat, fd)
        finally:
            _close(fd)
        placed = self._placed(job, [names["sidecar"]], [st])
        job = await self._db(
            self.store.mark_step, job.id, owner, "sidecar", data={"placed": placed}
        )
        await files(place, folder, [(tmp, names["sidecar"])], placed)
        return await self._db(self.store.mark_step, job.id, owner, "sidecar", finished=True)

    async def _email(
        self,
        job: Job,
        owner: str,
        user: User,
        reason: str | None,
        files: _AsUser,
        kind: str | None = None,
    ) -> str | None:
        """Send the one email, or leave it to the user's digest; return a warning if in doubt.

        Over ``email.rate_limit`` emails in ``email.rate_window`` (or while
        the user's digest is waiting), the job is marked ``digest`` and the
        worker pool's digest loop tells of it later.
        """
        if not self.config.email.enabled or job.email_state in _NO_EMAIL:
            return None
        if job.email_state in (EmailState.SENDING, EmailState.UNCERTAIN):
            # We stopped between "sending" and "sent": it may have gone out.
            warning = (
                "email not resent: the gateway stopped while sending it, so it may "
                "have been delivered; `sftpgate jobs retry` sends it again"
            )
            await self._db(self.store.set_email_state, job.id, owner, EmailState.UNCERTAIN)
            log.warning("job %d: %s", job.id, warning)
            return warning
        poster = None
        names = job.data.get("outputs") or {}
        if reason is None and names.get("poster"):
            folder = await files.folder()
            data = await files(read_output, folder, names["poster"], POSTER_LIMIT)
            poster = Poster(names["poster"], data)
        kind = kind or ("rejected" if reason else "converted")
        try:
            message = self._message(job, user, reason, poster, kind)
        except ValueError as exc:  # a header that cannot be: retrying changes nothing
            await self._db(
                self.store.set_email_state, job.id, owner, EmailState.FAILED, f"email: {exc}"
            )
            raise PermanentJobError(f"email cannot be built: {exc}") from None
        rate = self.config.email
        log_id = await self._db(
            self.store.reserve_email, job, owner, rate.rate_limit, rate.rate_window, self.clock()
        )
        if log_id is None:
            log.info("job %d: %s over the email rate limit; told in a digest", job.id, job.login)
            return None
        try:
            await asyncio.to_thread(send, message, self.config.smtp)
        except TransientEmailError as exc:
            await self._db(self.store.unreserve_email, job, owner, log_id, f"email: {exc}")
            raise SftpgateError(f"email: {exc}") from None
        except PermanentEmailError as exc:
            await self._db(
                self.store.set_email_state, job.id, owner, EmailState.FAILED, f"email: {exc}"
            )
            raise PermanentJobError(f"email refused: {exc}") from None
        await self._db(self.store.set_email_state, job.id, owner, EmailState.SENT)
        return None

    def _message(
        self, job: Job, user: User, reason: str | None, poster: Poster | None, kind: str
    ) -> Any:
        source = job.data.get("source") or {}
        names = job.data.get("outputs") or {}
        out_dir = "/" + self.config.pipeline.output_dir
        outputs = [
            posixpath.join(out_dir, names[k]) for k in ("flv", "sidecar", "poster") if names.get(k)
        ]
        outputs += [posixpath.join(out_dir, n) for n in names.get("thumbnails", [])]
        width, height = source.get("width"), source.get("height")
        context: dict[str, str | list[str]] = {
            "name": user.name,
            "surname": user.surname,
            "login": user.login,
            "file": job.path,
            "duration": format_duration(source["duration"]) if source.get("duration") else "?",
            "resolution": f"{width}x{height}" if width and height else "?",
            "outputs": outputs,
            "reason": reason or "",
            "job_id": str(job.id),
        }
        rendered = render(kind, context, self.config.email.templates_dir)
        return build_message(
            rendered, sender=self.config.smtp.sender, recipient=user.email, poster=poster
        )

    # -- digests ---------------------------------------------------------------

    async def send_digests(self) -> int:
        """Send each user whose notices wait for a digest, and who may get an email now, one.

        Returns how many digests went out. A transient SMTP failure puts the
        notices back (they wait for the next try); a permanent one marks them
        ``failed``. Never raises for SMTP failures.
        """
        rate = self.config.email
        if not rate.enabled:
            return 0
        sent = 0
        logins = await self._db(
            self.store.digests_due, rate.rate_limit, rate.rate_window, self.clock()
        )
        for login in logins:
            claimed = await self._db(
                self.store.claim_digest, login, rate.rate_limit, rate.rate_window, self.clock()
            )
            if claimed is None:
                continue
            log_id, jobs = claimed
            state, error = EmailState.SENT, None
            try:
                message = self._digest(login, jobs)
                await asyncio.to_thread(send, message, self.config.smtp)
                sent += 1
            except TransientEmailError as exc:
                state, error = EmailState.DIGEST, f"email: {exc}"
            except (PermanentEmailError, ValueError) as exc:
                state, error = EmailState.FAILED, f"email: {exc}"
            if error is not None:
                log.warning("digest to %s (%d jobs): %s", login, len(jobs), error)
            await self._db(self.store.digest_sent, log_id, jobs, state, error)
        return sent

    def _digest(self, login: str, jobs: list[Job]) -> Any:
        user = self.config.user(login)
        if user is None:
            raise PermanentEmailError(f"user {login!r} is no longer in the config")
        out_dir = "/" + self.config.pipeline.output_dir
        items = []
        for job in jobs:
            names = job.data.get("outputs") or {}
            if job.outcome == Outcome.CONVERTED.value and names.get("flv"):
                items.append(f"{job.path}: converted: {posixpath.join(out_dir, names['flv'])}")
            else:
                why = job.data.get("rejected") or job.data.get("refused") or job.state.value
                items.append(f"{job.path}: not converted: {why}")
        context: dict[str, str | list[str]] = {
            "name": user.name,
            "surname": user.surname,
            "login": user.login,
            "items": items,
            "count": str(len(items)),
        }
        rendered = render("digest", context, self.config.email.templates_dir)
        return build_message(rendered, sender=self.config.smtp.sender, recipient=user.email)
