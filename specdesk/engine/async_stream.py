"""An asyncio view of `LLM.deltas`: async servers and LangChain's `astream` read deltas without blocking
the event loop, and abandoning the iteration aborts the requests (invariant 4: their pages are freed).

`LLM.deltas` blocks on a queue, so each request gets a small pump thread that hands its deltas to the
event loop with `call_soon_threadsafe`. Waiting on the loop side is a plain `asyncio.Queue.get`: no
executor slot is held per waiting request, so many slow streams cannot starve the default thread pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

from specdesk.engine.outputs import StreamDelta

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM


async def aiter_deltas(llm: LLM, request_ids: Sequence[str]) -> AsyncGenerator[StreamDelta, None]:
    """Yield the deltas of already submitted requests, interleaved as the engine produces them, until
    every one of them has delivered its final delta.

    Closing the iterator early (consumer stopped, task cancelled because the client went away) aborts
    every request that has not finished; the engine frees their pages at its next step boundary.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[StreamDelta] = asyncio.Queue()
    for request_id in request_ids:
        threading.Thread(
            target=_pump, args=(llm, request_id, loop, queue), name=f"specdesk-pump-{request_id}", daemon=True
        ).start()
    unfinished = set(request_ids)
    try:
        while unfinished:
            delta = await queue.get()
            if delta.finished:
                unfinished.discard(delta.request_id)
            yield delta
    finally:
        # Each pump then receives its request's final (aborted) delta and exits on its own.
        for request_id in unfinished:
            llm.abort(request_id)


def _pump(llm: LLM, request_id: str, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[StreamDelta]) -> None:
    reader_gone = False
    # Read to the final delta even when nobody listens any more: `LLM.deltas` releases its stream then.
    for delta in llm.deltas(request_id):
        if reader_gone:
            continue
        try:
            loop.call_soon_threadsafe(queue.put_nowait, delta)
        except RuntimeError:  # the event loop is closed: nobody will read this stream
            reader_gone = True
            llm.abort(request_id)
