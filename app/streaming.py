"""Events on the wire: NDJSON lines or server-sent events, with a heartbeat while nothing else is sent.

The events themselves (their order and models) are in `app/events.py`; the service produces them
(`OCRService.events`). A proxy with an idle timeout (nginx: 60 s) would cut a stream that is quiet while
a long page runs, so `with_heartbeat` sends a `ping` every HEARTBEAT_S of silence: an SSE comment line
(`: ping`, ignored by EventSource) or an NDJSON `{"event": "ping"}` line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

from app.events import Event, PingEvent

HEARTBEAT_S = 15.0  # seconds of silence before a stream sends a `ping`


def ndjson(event: Event) -> bytes:
    return event.model_dump_json().encode() + b"\n"


def server_sent(event: Event, ids: Callable[[Event], int | None] | None = None) -> bytes:
    """One SSE message; with `ids`, an `id:` field where it gives one (a resumable stream: `Last-Event-ID`)."""
    if isinstance(event, PingEvent):
        return b": ping\n\n"
    event_id = ids(event) if ids is not None else None
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event.event}\ndata: {event.model_dump_json()}\n\n".encode()


async def with_heartbeat(
    events: AsyncGenerator[Event, None], interval: float | None = None
) -> AsyncGenerator[Event, None]:
    """`events`, plus a `PingEvent` after every `interval` seconds (default HEARTBEAT_S) without one.

    `events` runs in a task of its own, always the same one (its deadlines and clean-up stay in one task);
    closing this generator cancels that task and waits for `events` to finish closing (pages cancelled).
    """
    every = HEARTBEAT_S if interval is None else interval
    queue: asyncio.Queue[Event | Exception | None] = asyncio.Queue(maxsize=1)  # None: the end

    async def produce() -> None:
        try:
            async for event in events:
                await queue.put(event)
        except Exception as exc:  # handed to the consumer
            await queue.put(exc)
            return
        finally:
            await events.aclose()
        await queue.put(None)

    producer = asyncio.create_task(produce(), name="event-stream")
    try:
        while True:
            try:
                async with asyncio.timeout(every):
                    item = await queue.get()
            except TimeoutError:
                yield PingEvent()
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({producer})
