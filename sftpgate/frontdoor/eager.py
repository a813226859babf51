"""Run a coroutine now, up to the first time it waits (Python 3.12's eager task start)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now, up to the first time it waits; None if it finished.

    If it has to wait, the rest runs in a task, returned: it first waits for
    what the coroutine is waiting on, then resumes it where it stopped. This
    is Python 3.12's eager task start, for the 3.11 this runs on too: most
    requests never wait, and a task per request cost a scheduling round
    each. Exceptions raised before the first wait are raised here.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_resume(coro, waiting))


class _Rest:
    """Awaitable: the rest of a coroutine that ``start_eagerly`` ran until it waited."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        coro, waiting = self.coro, self.waiting
        while True:
            # The task waits for what the coroutine waits for (a future, or
            # None for a bare yield), then resumes it, or throws in what was
            # thrown at the task (its cancellation).
            try:
                yield waiting
            except BaseException as exc:  # handed on, as ``yield from`` would
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(None)
            except StopIteration:
                return


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _Rest(coro, waiting)
