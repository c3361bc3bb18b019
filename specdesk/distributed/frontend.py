"""The ingress deployment: the console (Gradio), `/v1` and `/metrics`, the same FastAPI app as the
one-process server, with a `RemoteLLM` in place of the in-process engine.

The front end owns the database: it stores every message and sends each turn's full prompt to the
engine replicas, which never touch the database (so PostgreSQL is needed only for several front ends).
`/v1` calls are routed by the caller's conversation when it names one: the `x-session-id` header, else
the body's `user` field; otherwise by the prompt (distributed/affinity.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any, cast

from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specdesk.app.chat_service import ChatService
from specdesk.app.server import create_app
from specdesk.app.settings import Settings
from specdesk.db import ChatRepository, make_engine
from specdesk.distributed.affinity import routing_scope
from specdesk.distributed.remote_llm import RemoteLLM

log = logging.getLogger("specdesk")

# A `user` field is looked for in request bodies up to this size; a larger body is routed by its prompt.
MAX_ROUTED_BODY_BYTES = 1 << 20


@serve.ingress()
class Frontend:
    """One front-end replica: a `ChatService` on a `RemoteLLM` and the repository of `settings`."""

    async def __init__(self, engine: Any, settings: Settings, num_engine_replicas: int, fail_pending: bool) -> None:  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self.settings = settings
        self.llm = await RemoteLLM.connect(engine, num_replicas=num_engine_replicas)
        repository = ChatRepository(make_engine(settings.database_url))
        # Only a sole front end may fail pending replies: with several, the others' are still streaming.
        if fail_pending and (num_failed := repository.fail_pending_messages()):
            log.warning("marked %d reply(ies) left pending by the last run as errors", num_failed)
        self.service = ChatService(cast(Any, self.llm), repository, settings)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return SessionRouting(create_app(self.service, self.settings))

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


class SessionRouting:
    """ASGI middleware: a `/v1` request that names its conversation (`x-session-id`, or the JSON body's
    `user`) is routed by that name, so its turns share one replica's cache."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        session = headers.get(b"x-session-id", b"").decode("latin-1").strip()
        if session:
            with routing_scope(f"session:{session}"):
                await self.app(scope, receive, send)
            return
        body, replay = await _buffer_body(receive)
        user = _user_field(body)
        with routing_scope(f"user:{user}" if user else None):
            await self.app(scope, replay, send)


async def _buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    """Read the request body (it is small: a JSON call) and return it with a `receive` that replays it."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body") or size > MAX_ROUTED_BODY_BYTES:
            break
    body = b"".join(m.get("body", b"") for m in messages) if size <= MAX_ROUTED_BODY_BYTES else b""

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay


def _user_field(body: bytes) -> str | None:
    try:
        user = json.loads(body).get("user") if body else None
    except (ValueError, AttributeError):
        return None  # the API answers a bad body itself
    return user if isinstance(user, str) and user.strip() else None
