"""The steps a completed video upload goes through, each idempotent.

probe (+ validate) → transcode (one ffmpeg pass: FLV + poster + thumbnails)
→ sidecar JSON → email. A finished step leaves a marker on the job row and is
skipped when the job runs again after a crash or a retry. Outputs are written
under temporary names and renamed into place; their final names are chosen
once, stored on the job, and reused by every later attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .config import Config, User
from .errors import JailError, SftpgateError
from .frontdoor.jail import Jail
from .frontdoor.ssh import owner_for
from .jobs.model import EmailState, Job, Outcome
from .jobs.store import JobStore
from .media import MediaError
from .media.facts import MediaFacts
from .media.flv import keyframe_count
from .media.plan import plan_convert, thumbnail_files, thumbnail_pattern
from .media.probe import probe
from .media.run import run_ffmpeg
from .media.sidecar import build_sidecar, sha256_file
from .media.validate import validate
from .notify import PermanentEmailError, TransientEmailError
from .notify.message import build_message
from .notify.smtp import send
from .notify.templates import format_duration, render

log = logging.getLogger(__name__)
T = TypeVar("T")


class PermanentJobError(SftpgateError):
    """Retrying will not help (the upload is gone, the user was removed, 5xx from SMTP)."""


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    output: str | None  # the FLV as the user sees it, for the journal
    message: str
    warning: str | None = None


def choose_outputs(folder: str, stem: str, thumbnails: int) -> dict[str, Any]:
    """Pick output names in ``folder`` that no earlier file uses (suffix -1, -2 ...). Blocking."""
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
        if not any(os.path.lexists(os.path.join(folder, name)) for name in every):
            return names
    raise PermanentJobError(f"no free output name for {stem!r} in {folder}")


class Pipeline:
    """Runs one job's steps. The worker pool owns leasing, heartbeats and outcomes."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.store.executor, lambda: fn(*args, **kwargs))

    async def run(self, job: Job, owner: str, progress: Callable[[float, str], None]) -> Result:
        """Run the steps still to do; raise PermanentJobError or anything else (= retry)."""
        user = self.config.user(job.login)
        if user is None:
            raise PermanentJobError(f"user {job.login!r} is no longer in the config")
        jail = Jail(user.home)
        try:
            source = await asyncio.to_thread(jail.resolve, os.fsencode(job.path))
        except JailError as exc:
            raise PermanentJobError(f"the upload path leads outside the home: {exc}") from None
        if not await asyncio.to_thread(os.path.isfile, source.local):
            raise PermanentJobError("the upload is gone (removed or renamed before conversion)")
        src = Path(os.fsdecode(source.local))

        if not job.done("probe"):
            progress(0.0, "probe")
            job = await self._probe(job, owner, src)
        reason = job.data.get("rejected")
        if reason is None:
            if not job.done("transcode"):
                job = await self._transcode(job, owner, user, jail, src, progress)
            if not job.done("sidecar"):
                progress(0.95, "sidecar")
                job = await self._sidecar(job, owner, user, src)
        progress(0.98, "email")
        warning = await self._email(job, owner, user, reason)
        outputs = job.data.get("outputs", {})
        if reason is not None:
            return Result(Outcome.REJECTED, None, reason, warning)
        flv = posixpath.join("/", self.config.pipeline.output_dir, outputs["flv"])
        return Result(Outcome.CONVERTED, flv, "converted", warning)

    async def _probe(self, job: Job, owner: str, src: Path) -> Job:
        cfg = self.config.pipeline
        await self._db(self.store.mark_step, job.id, owner, "probe")
        try:
            data = await asyncio.to_thread(probe, src, cfg.ffprobe, 120)
            facts = MediaFacts.from_probe(data)
        except MediaError as exc:
            return await self._db(
                self.store.mark_step,
                job.id,
                owner,
                "probe",
                finished=True,
                data={"rejected": exc.reason},
            )
        reason = validate(facts, cfg)
        update: dict[str, Any] = {"source": facts.to_dict()}
        if reason is not None:
            update["rejected"] = reason
        return await self._db(
            self.store.mark_step, job.id, owner, "probe", finished=True, data=update
        )

    async def _output_folder(self, user: User, jail: Jail) -> str:
        virtual = os.fsencode("/" + self.config.pipeline.output_dir)

        def make() -> str:
            resolved = jail.resolve(virtual)  # refuses a folder that is a link out of the home
            if not os.path.isdir(resolved.local):
                os.makedirs(resolved.local, mode=0o755, exist_ok=True)
                owner = owner_for(user)  # may stat the home: here, in the thread
                if owner is not None:
                    os.chown(resolved.local, *owner)
            return os.fsdecode(jail.resolve(virtual).local)

        try:
            return await asyncio.to_thread(make)
        except JailError as exc:
            raise PermanentJobError(f"output folder: {exc}") from None

    async def _transcode(
        self,
        job: Job,
        owner: str,
        user: User,
        jail: Jail,
        src: Path,
        progress: Callable[[float, str], None],
    ) -> Job:
        cfg = self.config.pipeline
        folder = await self._output_folder(user, jail)
        names: dict[str, Any] | None = job.data.get("outputs")
        if names is None:  # chosen once; later attempts reuse them
            stem = posixpath.splitext(posixpath.basename(job.path))[0] or "video"
            names = await asyncio.to_thread(choose_outputs, folder, stem, cfg.thumbnails)
        job = await self._db(
            self.store.mark_step,
            job.id,
            owner,
            "transcode",
            data={"outputs": names, "folder": folder},
        )
        tmp = f".part-{job.id}-"
        flv_tmp = Path(folder, tmp + names["flv"])
        poster_tmp = Path(folder, tmp + names["poster"])
        thumbs_stem = tmp + names["base"] + "-thumb"
        thumbs_tmp = thumbnail_pattern(Path(folder), thumbs_stem)
        facts = MediaFacts(**job.data["source"])
        argv = plan_convert(src, flv_tmp, poster_tmp, thumbs_tmp, facts, cfg)

        pending: list[asyncio.Task[None]] = []

        def started(pid: int) -> None:
            # Recorded at once so that after a crash the restart can kill it.
            pending.append(
                asyncio.get_running_loop().create_task(
                    self._db(self.store.set_pid, job.id, owner, pid, str(flv_tmp))
                )
            )

        await run_ffmpeg(
            argv,
            timeout=cfg.timeout,
            nice=cfg.nice,
            memory_limit=cfg.memory_limit,
            duration=facts.duration,
            on_progress=lambda f: progress(0.05 + 0.9 * f, "transcode"),
            on_start=started,
        )
        await asyncio.gather(*pending)
        await self._db(self.store.set_pid, job.id, owner, None, None)
        moves = [(flv_tmp, names["flv"]), (poster_tmp, names["poster"])]
        made = thumbnail_files(Path(folder), thumbs_stem, len(names["thumbnails"]))
        moves += list(zip(made, names["thumbnails"], strict=True))
        await asyncio.to_thread(self._place, moves, folder, user)
        return await self._db(self.store.mark_step, job.id, owner, "transcode", finished=True)

    @staticmethod
    def _place(moves: list[tuple[Path, str]], folder: str, user: User) -> None:
        for tmp, name in moves:
            if not tmp.exists():
                raise MediaError(f"ffmpeg did not write {name}")
        owner = owner_for(user)
        for tmp, name in moves:
            if owner is not None:
                os.chown(tmp, *owner)
            os.replace(tmp, os.path.join(folder, name))

    async def _sidecar(self, job: Job, owner: str, user: User, src: Path) -> Job:
        cfg = self.config.pipeline
        names, folder = job.data["outputs"], job.data["folder"]
        flv = Path(folder, names["flv"])
        await self._db(self.store.mark_step, job.id, owner, "sidecar")
        digest = await asyncio.to_thread(sha256_file, src)
        out = MediaFacts.from_probe(await asyncio.to_thread(probe, flv, cfg.ffprobe, 120))
        keyframes = await asyncio.to_thread(keyframe_count, flv)
        uploaded = await self._db(
            lambda: self.store.conn.execute(
                "SELECT ts FROM uploads WHERE id = ?", (job.upload_id,)
            ).fetchone()
        )
        sidecar = build_sidecar(
            MediaFacts(**job.data["source"]),
            job.path,
            digest,
            {"login": user.login, "name": user.name, "surname": user.surname, "email": user.email},
            uploaded[0] if uploaded else job.created_at,
            out,
            names["flv"],
            keyframes,
            names["poster"],
            list(names["thumbnails"]),
        )
        target = os.path.join(folder, names["sidecar"])

        def write() -> None:
            tmp = os.path.join(folder, f".part-{job.id}-{names['sidecar']}")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(sidecar, f, indent=2, ensure_ascii=False)
                f.write("\n")
            owner_ids = owner_for(user)  # may stat the home: here, in the thread
            if owner_ids is not None:
                os.chown(tmp, *owner_ids)
            os.replace(tmp, target)

        await asyncio.to_thread(write)
        return await self._db(self.store.mark_step, job.id, owner, "sidecar", finished=True)

    async def _email(self, job: Job, owner: str, user: User, reason: str | None) -> str | None:
        """Send the one email; return a warning for the job if it is in doubt."""
        if not self.config.email.enabled or job.email_state in (EmailState.SENT, EmailState.FAILED):
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
        message = self._message(job, user, reason)
        await self._db(self.store.set_email_state, job.id, owner, EmailState.SENDING)
        try:
            await asyncio.to_thread(send, message, self.config.smtp)
        except TransientEmailError as exc:
            await self._db(self.store.set_email_state, job.id, owner, EmailState.NONE)
            raise SftpgateError(f"email: {exc}") from None
        except PermanentEmailError as exc:
            await self._db(
                self.store.set_email_state, job.id, owner, EmailState.FAILED, f"email: {exc}"
            )
            raise PermanentJobError(f"email refused: {exc}") from None
        await self._db(self.store.set_email_state, job.id, owner, EmailState.SENT)
        return None

    def _message(self, job: Job, user: User, reason: str | None) -> Any:
        source = job.data.get("source") or {}
        names = job.data.get("outputs") or {}
        out_dir = "/" + self.config.pipeline.output_dir
        outputs = [
            posixpath.join(out_dir, names[k]) for k in ("flv", "sidecar", "poster") if k in names
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
        rendered = render(
            "rejected" if reason else "converted", context, self.config.email.templates_dir
        )
        poster = None
        if reason is None and names.get("poster"):
            poster = Path(job.data["folder"], names["poster"])
        return build_message(
            rendered, sender=self.config.smtp.sender, recipient=user.email, poster=poster
        )
