"""Running one awaitable unless another finishes first (a client that leaves, an engine core that dies)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def unless(work: Awaitable[T], stop: Awaitable[object]) -> tuple[bool, T | None]:
    """(True, work's result) when `work` finishes first (its exception propagates); (False, None) when `stop` does:
    `work` is then cancelled and awaited, so nothing it started outlives the call. `stop` never outlives it."""
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop)
    try:
        await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
    if job.cancelled():
        return False, None
    return True, job.result()
