"""Start the console: one engine, one database, the Gradio UI at /, the OpenAI-compatible API at /v1
and Prometheus metrics at /metrics, all in one process and one FastAPI app.

    service = build_service(settings)        # loads the model (minutes the very first time)
    app = create_app(service, settings)      # FastAPI with everything mounted
    uvicorn.run(app, host=..., port=...)     # or serve(settings) for all three
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio
import fastapi
import gradio as gr
import uvicorn
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specdesk.app.auth import LoginThrottle
from specdesk.app.chat_service import ChatService
from specdesk.app.settings import Settings
from specdesk.app.style import launch_style
from specdesk.app.ui import build_demo
from specdesk.db import ChatRepository, make_engine

log = logging.getLogger("specdesk")

logger = logging.getLogger(__name__)


def build_service(settings: Settings) -> ChatService:
    """Load the model, open (and migrate) the database, and fail replies a crash left pending."""
    from specdesk.engine.llm import LLM  # torch and transformers load here, never at import

    repository = ChatRepository(make_engine(settings.database_url))
    num_failed = repository.fail_pending_messages()
    if num_failed:
        log.warning("marked %d reply(ies) left pending by the last run as errors", num_failed)
    llm = LLM(**dataclasses.asdict(settings.engine))
    return ChatService(llm, repository, settings)


def create_app(service: ChatService, settings: Settings) -> fastapi.FastAPI:
    """FastAPI app with /v1 and /metrics (when their modules are installed) and the console at /.

    Raises ValueError when the settings would leave /v1 open on a console that needs a login.
    """
    settings.check_serving()
    if settings.weak_password_agents:
        log.warning(
            "agents %s have a plain or unsalted sha256 password: replace each with `specdesk hash-password`",
            ", ".join(settings.weak_password_agents),
        )
    app = fastapi.FastAPI(title="SpecDesk", docs_url=None, redoc_url=None)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> fastapi.Response:
        # Unauthenticated on purpose (container health checks), so it says nothing but whether it serves.
        # The engine's own error (an exception's text) goes to the log, never to an anonymous caller.
        error = service.llm.error
        if error is not None:
            logger.error("healthz: the engine is not serving: %s", error)
            return JSONResponse({"status": "error", "error": "the engine is not serving"}, status_code=503)
        return JSONResponse({"status": "ok"})

    _mount_api(app, service, settings)
    demo = build_demo(service)
    # The queue is sized to the engine's batch: `max_num_seqs` turns stream at once and the engine
    # batches them; quick events have their own unlimited lane (see app/ui_console.py).
    demo.queue(default_concurrency_limit=service.max_concurrent_turns, max_size=4 * service.max_concurrent_turns)
    auth = sign_in_callback(settings, LoginThrottle(max_failures=5), LoginThrottle(max_failures=20))
    app = gr.mount_gradio_app(
        app, demo, path="", auth=auth if settings.auth_required else None,
        auth_message="SpecDesk: sign in with your agent account.",
        show_error=True, footer_links=["api"], **launch_style(),
    )  # fmt: skip
    app.add_middleware(SessionGuard)
    return app


def _mount_api(app: fastapi.FastAPI, service: ChatService, settings: Settings) -> None:
    # The API and metrics modules are another team's; the console runs without them.
    try:
        from specdesk.app.api import mount_openai_api
    except ImportError as exc:
        log.warning("OpenAI-compatible API not mounted: %s", exc)
    else:
        mount_openai_api(app, service.llm, service.model_name, list(settings.api_keys))
    try:
        from specdesk.app.metrics import mount_metrics
    except ImportError as exc:
        log.warning("/metrics not mounted: %s", exc)
    else:
        mount_metrics(app, service.llm, list(settings.api_keys) if settings.metrics_need_key else None)


# The client address of the sign-in being checked: Gradio hands its auth callback only name and password.
_client_address: contextvars.ContextVar[str] = contextvars.ContextVar("specdesk_client_address", default="")


def sign_in_callback(settings: Settings, by_user: LoginThrottle, by_address: LoginThrottle) -> Any:
    """Gradio's `auth=` callback: refuse (429) a name or address with too many recent failures, else
    check the password off the event loop (scrypt is slow on purpose) and count a failure."""

    async def check(username: str, password: str) -> bool:
        user, address = f"user:{username}", f"address:{_client_address.get()}"
        wait = max(by_user.retry_after([user]) or 0, by_address.retry_after([address]) or 0)
        if wait > 0:
            raise fastapi.HTTPException(
                429, "Too many failed sign-ins: try again later.", headers={"Retry-After": str(int(wait) + 1)}
            )
        ok = await anyio.to_thread.run_sync(settings.check_login, username, password)
        if ok:
            by_user.clear(user)
        else:
            by_user.record_failure([user])
            by_address.record_failure([address])
        return ok

    return check  # a plain `async def`: Gradio awaits the callback only when it is a coroutine function


class SessionGuard:
    """ASGI middleware for the console's session cookies and sign-in.

    * Tells the sign-in callback the client's address (uvicorn resolves X-Forwarded-For from trusted
      proxies into `scope["client"]`).
    * Gradio sets its session cookies `SameSite=None` (for embedding in other sites' pages) and one of
      them without `Secure`. SpecDesk is never embedded: both become `SameSite=Lax`, so a cross-site
      request never carries a session, and `Secure` when the browser reached us over https (directly,
      or through a proxy that says so in X-Forwarded-Proto).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        forwarded = headers.get(b"x-forwarded-proto", b"").split(b",")[0].strip().lower()
        https = scope.get("scheme") == "https" or forwarded == b"https"

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, _harden_cookie(v, https) if k.lower() == b"set-cookie" else v) for k, v in message["headers"]
                ]
            await send(message)

        client = scope.get("client")
        token = _client_address.set(client[0] if client else "unknown")
        try:
            await self.app(scope, receive, send_secured)
        finally:
            _client_address.reset(token)


def _harden_cookie(value: bytes, https: bool) -> bytes:
    parts = [p.strip() for p in value.decode("latin-1").split(";")]
    kept = [p for p in parts if p.split("=")[0].strip().lower() != "samesite"]
    kept.append("SameSite=Lax")
    if https and not any(p.lower() == "secure" for p in kept):
        kept.append("Secure")
    return "; ".join(kept).encode("latin-1")


@dataclass
class RunningServer:
    """A server started in a background thread (tests, screenshots). `stop()` shuts it down."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=2)
        if self.thread.is_alive():  # open event streams keep a graceful shutdown waiting
            self.server.force_exit = True
            self.thread.join(timeout=10)


def start_in_thread(app: fastapi.FastAPI, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve `app` from a daemon thread; port 0 picks a free one. Returns once it accepts requests."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="specdesk-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://{host}:{bound}")


def serve(settings: Settings) -> None:
    """Load everything and serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.check_serving()  # before minutes of model loading
    log.info("loading the model (the first start converts the default model once; this can take a minute)")
    service = build_service(settings)
    app = create_app(service, settings)
    if not settings.auth_required and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a login: set SPECDESK_AGENTS or an agents file", settings.host)
    log.info("SpecDesk console on http://%s:%d (model %s)", settings.host, settings.port, service.model_name)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        service.llm.shutdown()
