"""The one way a test waits: poll a condition until it holds, or fail after a deadline naming
what it waited for. Never a sleep that hopes."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

# Seconds between polls: often enough to add little to a test, rarely enough to cost nothing.
EVERY = 0.02


async def wait_for(
    check: Callable[[], Any | Awaitable[Any]], timeout: float, what: str, every: float = EVERY
) -> Any:
    """Return `check()`'s first truthy value (awaited if it is awaitable)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


def wait_for_blocking(
    check: Callable[[], Any], timeout: float, what: str, every: float = EVERY
) -> Any:
    """`wait_for` for code outside an event loop (threads, process helpers)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
