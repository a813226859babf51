"""The gateway's memory budget (``server.receive_budget``) and the write-behind's error paths.

Many sessions uploading at once into a gateway whose budget is small and
whose one filesystem thread is the bottleneck: sessions stop reading (their
SSH windows stay shut) while the budget is spent, everything still arrives
intact, the budget never goes far past its limit, and it is all given back.
The write-behind queue closes its descriptor and returns its budget on every
error path, not just ``OSError``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from conftest import RunningGateway, asyncssh_login, start_gateway
from hostile_kit import open_fds
from sftpgate.frontdoor.handler import MAX_PACKET
from sftpgate.frontdoor.writebehind import WriteBudget, WriteQueue, write_chunks

BUDGET = 1024 * 1024
SESSIONS = 12
SIZE = 4 * 1024 * 1024


def drained(budget: WriteBudget, timeout: float = 10) -> bool:
    """Whether the budget comes back to nothing held and no one waiting (sessions end async)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (budget.queued, budget.received, budget.waiting) == (0, 0, set()):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def tight(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = start_gateway(
        tmp_path, user_keys, extra={"server": {"receive_budget": BUDGET, "io_threads": 1}}
    )
    try:
        yield running
    finally:
        running.stop()


async def _upload_all(port: int, payload: bytes) -> None:
    # Logged in one after another (the defender lets one address wait on only a few
    # password checks at once), then every upload at the same moment.
    conns = []
    try:
        for _ in range(SESSIONS):
            conns.append(await asyncssh_login(port))
        clients = [await conn.start_sftp_client() for conn in conns]

        async def one(n: int, sftp: asyncssh.SFTPClient) -> None:
            async with sftp.open(f"up-{n}.bin", "wb") as f:
                await f.write(payload)

        await asyncio.gather(*(one(n, sftp) for n, sftp in enumerate(clients)))
    finally:
        for conn in conns:
            conn.close()


def test_sessions_stop_reading_while_the_budget_is_spent_and_lose_nothing(
    tight: RunningGateway,
) -> None:
    budget = tight.gateway.write_budget
    payload = os.urandom(SIZE)
    asyncio.run(asyncio.wait_for(_upload_all(tight.port, payload), 120))
    for n in range(SESSIONS):
        assert (tight.home("alice") / f"up-{n}.bin").read_bytes() == payload
    assert budget.pauses > 0, "the budget was never spent: the test did not test it"
    # At most the budget and, per session, the request it was reading plus one read.
    assert budget.peak <= BUDGET + SESSIONS * (MAX_PACKET + 256 * 1024)
    assert drained(budget), (budget.queued, budget.received, budget.waiting)


def test_a_budget_wakes_its_waiting_sessions_once_drained_below_three_quarters() -> None:
    woken: list[str] = []

    class Session:
        def __init__(self, name: str) -> None:
            self.name = name

        def budget_drained(self) -> None:
            woken.append(self.name)

    budget = WriteBudget(100)
    budget.change(queued=60, received=40)
    assert budget.spent and budget.peak == 100
    budget.wait(Session("a"))  # type: ignore[arg-type]
    budget.wait(Session("b"))  # type: ignore[arg-type]
    budget.change(received=-20)  # 80: still above 75
    assert woken == []
    budget.change(queued=-10)  # 70
    assert sorted(woken) == ["a", "b"] and budget.waiting == set() and budget.pauses == 2


def test_a_write_past_off_t_is_an_error_of_the_batch_never_an_exception(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written, error = write_chunks(fd, [(0, b"ok"), (2**63, b"no")])
    finally:
        os.close(fd)
    assert written == 2
    assert isinstance(error, OSError) and error.errno == errno.EFBIG


def test_a_close_whose_write_raises_anything_closes_the_descriptor_and_returns_the_budget(
    tmp_path: Path,
) -> None:
    # A fake write: no real filesystem call raises anything but OSError, and this
    # is the path a bug (or a future change) would take.
    def broken(fd: int, chunks: list[tuple[int, bytes | memoryview]]) -> tuple[int, None]:
        raise RuntimeError("a bug in the write path")

    async def run() -> tuple[OSError | None, WriteBudget, bool]:
        budget = WriteBudget(1 << 20)
        fd = os.open(tmp_path / "g", os.O_WRONLY | os.O_CREAT, 0o600)
        loop = asyncio.get_running_loop()

        async def pool(fn: object, *args: object) -> object:
            return await loop.run_in_executor(None, fn, *args)  # type: ignore[arg-type]

        queue = WriteQueue(fd, pool, budget, per_handle_limit=1 << 20, write=broken)
        await queue.add(0, b"x" * 1000)  # small: waits for the CLOSE
        error = await queue.close()
        return error, budget, queue.closed

    before = open_fds()
    error, budget, closed = asyncio.run(run())
    assert closed and open_fds() == before  # the descriptor is closed
    assert (budget.queued, budget.received) == (0, 0)
    assert isinstance(error, OSError) and "RuntimeError" in str(error)
    assert "a bug" not in str(error)  # an internal error's words never reach a client


def test_a_batch_whose_write_raises_anything_fails_the_upload_cleanly(tmp_path: Path) -> None:
    # A fake write, as above: a flushed batch (not the close) that raises.
    def broken(fd: int, chunks: list[tuple[int, bytes | memoryview]]) -> tuple[int, None]:
        raise ValueError("a bug")

    async def run() -> tuple[WriteQueue, WriteBudget, OSError | None]:
        budget = WriteBudget(1 << 20)
        fd = os.open(tmp_path / "h", os.O_WRONLY | os.O_CREAT, 0o600)
        loop = asyncio.get_running_loop()

        async def pool(fn: object, *args: object) -> object:
            return await loop.run_in_executor(None, fn, *args)  # type: ignore[arg-type]

        queue = WriteQueue(fd, pool, budget, per_handle_limit=1 << 20, write=broken)
        await queue.add(0, b"y" * (512 * 1024))  # big: flushed at once
        await queue.drain()
        return queue, budget, await queue.close()

    before = open_fds()
    queue, budget, _ = asyncio.run(run())
    assert queue.closed and open_fds() == before
    assert isinstance(queue.error, OSError) and queue.error.errno == errno.EIO
    assert (budget.queued, budget.received) == (0, 0)


def test_the_public_api_path_is_bounded_too(
    tmp_path: Path, user_keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFTPGATE_SERVER__FAST_PATHS", "off")
    running = start_gateway(
        tmp_path, user_keys, extra={"server": {"receive_budget": BUDGET, "io_threads": 1}}
    )
    try:
        assert not running.gateway.fast_paths
        payload = os.urandom(SIZE)
        asyncio.run(asyncio.wait_for(_upload_all(running.port, payload), 120))
        for n in range(SESSIONS):
            assert (running.home("alice") / f"up-{n}.bin").read_bytes() == payload
        budget = running.gateway.write_budget
        assert budget.pauses > 0
        assert drained(budget), (budget.queued, budget.received, budget.waiting)
    finally:
        running.stop()
