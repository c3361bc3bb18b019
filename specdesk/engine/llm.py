"""The public API: `LLM` runs the engine on one background thread and serves many callers' threads.

from specdesk.engine import LLM, SamplingParams
llm = LLM()                                    # built-in default model
outs = llm.generate(["a prompt", [1, 2, 3]], SamplingParams(max_tokens=64))
for delta in llm.stream(messages, params): print(delta.text, end="")
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from specdesk.engine.client import EngineClient, Prompt, render_chat
from specdesk.engine.config import EngineConfig
from specdesk.engine.llm_engine import EngineStats, LLMEngine, check_cache_salt
from specdesk.engine.models.loader import load_model, resolve_device
from specdesk.engine.outputs import FinishReason, StreamDelta
from specdesk.engine.sampling_params import SamplingParams
from specdesk.kernels.ops import resolve_backend

log = logging.getLogger(__name__)
# How often a caller blocked on a stream checks that the engine thread still lives (a last resort: the
# thread finishes every open stream itself before it stops).
_LIVENESS_POLL_S = 1.0


class LLM(EngineClient):
    """An in-process engine. Thread-safe: `generate`, `stream` and `chat` may be called from any thread."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **kwargs)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.loaded = load_model(
            self.config.model, dtype=self.config.dtype, device=self.config.device,
            attention_backend=resolve_backend(self.config.attention_backend, resolve_device(self.config.device)),
            max_model_len=self.config.max_model_len, tokenizer=self.config.tokenizer,
            trust_remote_code=self.config.trust_remote_code, quantization=self.config.quantization,
        )  # fmt: skip
        self.tokenizer = self.loaded.tokenizer
        self.engine = LLMEngine(self.config, self.loaded)
        self._inbox: list[tuple[str, Any]] = []
        self._streams: dict[str, queue.Queue[StreamDelta]] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._error: str | None = None  # why the engine thread stopped serving, once it has
        self._ids = itertools.count()
        self._listeners: list[Callable[[StreamDelta], None]] = []
        self._thread = threading.Thread(target=self._loop, name="specdesk-engine", daemon=True)
        self._thread.start()

    # ---- prompts ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render messages with the model's chat template, ready for the assistant's reply; text inside a
        message never becomes a control token (see `client.render_chat`)."""
        return render_chat(self.tokenizer, messages, self.loaded.name)

    # ---- serving ----------------------------------------------------------------------------------
    def submit(
        self, prompt: Prompt, params: SamplingParams | None = None, cache_salt: str | None = None,
        output_prefix: list[int] | None = None,
    ) -> str:  # fmt: skip
        """Queue a request and return its id; its deltas arrive through `deltas(request_id)`.
        `output_prefix`: reply tokens already generated elsewhere (see `LLMEngine.add_request`)."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.engine.validate_prompt(ids)  # fail in the caller's thread, before anything is queued
        check_cache_salt(cache_salt)
        self.engine.check_params(params)
        self.prepare_grammar(params)  # likewise a bad structured-output spec (the grammar is then cached)
        request_id = f"llm-{next(self._ids)}"
        with self._cv:
            if self._error is not None:
                raise RuntimeError(f"the engine has stopped serving: {self._error}")
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._streams[request_id] = queue.Queue()
            self._inbox.append(("add", (request_id, ids, params, cache_salt, output_prefix)))
            self._cv.notify()
        return request_id

    def prepare_grammar(self, params: SamplingParams) -> None:
        self.engine.compile_grammar(params)  # cached: submit's own call then finds it

    def _check_prompt(self, token_ids: list[int]) -> None:
        self.engine.validate_prompt(token_ids)

    def _discard(self, request_id: str) -> bool:
        return self._streams.pop(request_id, None) is not None

    def abort(self, request_id: str) -> None:
        """Stop a request; its pages are freed at the next step boundary."""
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify()

    def deltas(self, request_id: str) -> Iterator[StreamDelta]:
        """The deltas of a submitted request until its final one. Closing the iterator early aborts it.

        Never blocks forever: should the engine thread stop serving, the stream ends with an error delta.
        """
        q = self._streams[request_id]
        finished = False
        try:
            while not finished:
                delta = self._next_delta(request_id, q)
                finished = delta.finished
                yield delta
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- what the app may know about the engine (it never reaches into `engine` or `loaded`) ----------
    @property
    def model_name(self) -> str:
        """The model's display name (folder or hub id; the built-in model's own name)."""
        return self.loaded.name

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as a string ("bfloat16", "float32", ...)."""
        return str(self.loaded.dtype).removeprefix("torch.")

    @property
    def max_model_len(self) -> int:
        """The context window the engine serves: prompt and reply tokens together."""
        return self.engine.max_model_len

    @property
    def error(self) -> str | None:
        """None while the engine serves (or after a clean shutdown); otherwise why it stopped serving.

        Once set it stays: every open request has ended with this error and `submit` refuses new ones.
        """
        if self._error is None and not self._closed and not self._thread.is_alive():
            return "the engine thread has stopped"
        return self._error

    def add_listener(self, fn: Callable[[StreamDelta], None]) -> None:
        """Call fn(delta) for every delta of every request (metrics exporters). Runs on the engine
        thread, so it must be quick. One that raises is logged and removed: it never stops serving."""
        self._listeners.append(fn)

    def reset_prefix_cache(self) -> None:
        with self._cv:
            self._inbox.append(("reset", None))
            self._cv.notify()

    def forget_replies(self) -> None:
        """Drop the finished replies the n-gram speculator looks up (a no-op without one): served text
        leaves memory, and a benchmark run cannot be sped up by the replies of an earlier identical run.
        Takes effect before the engine's next step; output never depends on it, only speed."""
        with self._cv:
            self._inbox.append(("forget", None))
            self._cv.notify()

    def shutdown(self, *, keep_engine: bool = False) -> None:
        """Stop serving (every open request ends) and give back what the engine took from the process
        (`LLMEngine.close`); call it from the thread that built the LLM (kernels/cpu_lib.py's ThreadClaim).
        keep_engine: leave `self.engine` to a caller that steps it itself, and closes it after."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)
        if not keep_engine:  # even past the timeout: a step still running keeps its own thread's count
            self.engine.close()

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        """Serve until shutdown. Anything raised outside a step (handling an abort or a reset, delivering,
        or failing a broken step's requests) leaves the engine in an unknown state: it stops serving, and
        every open request ends with the reason instead of waiting forever."""
        try:
            while self._serve_once():
                pass
        except BaseException as exc:  # whatever it was, no caller may be left waiting
            log.exception("the engine thread failed; every open request is ended with an error")
            self._stop_serving(f"the engine thread failed: {type(exc).__name__}: {exc}", failed=True)
            return
        self._stop_serving("the engine was shut down", failed=False)

    def _serve_once(self) -> bool:
        """Handle the inbox and run one step; False once shut down."""
        with self._cv:
            while not self._inbox and not self.engine.has_work and not self._closed:
                self._cv.wait()
            if self._closed:
                return False
            inbox, self._inbox = self._inbox, []
        for kind, arg in inbox:
            self._handle(kind, arg)
        try:
            deltas = self.engine.step()
        except Exception as exc:  # a bug must not hang every caller: fail the live requests, keep serving
            deltas = self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
        for delta in deltas:
            self._deliver(delta)
        return True

    def _stop_serving(self, reason: str, failed: bool) -> None:
        """End every open stream with `reason`; after a failure, refuse new requests from now on."""
        with self._cv:
            if failed:
                self._error = reason
            self._inbox = []
            open_ids = list(self._streams)
        finals: list[StreamDelta] = []
        try:
            finals = self.engine.fail_all(reason)  # frees their pages and keeps their metrics, if it can
        except Exception:  # the engine is broken; the streams still get their final delta
            log.exception("could not fail the engine's live requests cleanly")
        ended = {d.request_id for d in finals}
        finals += [_error_delta(rid, reason) for rid in open_ids if rid not in ended]
        for delta in finals:
            self._notify_listeners(delta)
            q = self._streams.get(delta.request_id)
            if q is not None:
                q.put(delta)

    def _next_delta(self, request_id: str, q: queue.Queue[StreamDelta]) -> StreamDelta:
        while True:
            try:
                return q.get(timeout=_LIVENESS_POLL_S)
            except queue.Empty:
                if self._thread.is_alive():
                    continue
            try:  # the thread is gone: take what it left, else end the stream here
                return q.get_nowait()
            except queue.Empty:
                return _error_delta(request_id, self.error or "the engine was shut down")

    def _handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            request_id, ids, params, salt, prefix = arg
            try:
                self.engine.add_request(ids, params, request_id, salt, prefix)
            except (ValueError, TypeError) as exc:
                self._deliver(_error_delta(request_id, str(exc)))
        elif kind == "abort":
            delta = self.engine.abort(arg)
            if delta is not None:
                self._deliver(delta)
        elif kind == "reset":
            self.engine.block_manager.reset_prefix_cache()
        elif kind == "forget":
            self.engine.forget_replies()

    def _deliver(self, delta: StreamDelta) -> None:
        self._notify_listeners(delta)
        q = self._streams.get(delta.request_id)
        if q is not None:
            q.put(delta)

    def _notify_listeners(self, delta: StreamDelta) -> None:
        for fn in list(self._listeners):
            try:
                fn(delta)
            except Exception:  # an observer's bug must not end anyone's request
                log.exception("delta listener %r raised; it is removed", fn)
                self._listeners.remove(fn)


def _error_delta(request_id: str, error: str) -> StreamDelta:
    return StreamDelta(request_id, "", [], True, FinishReason.ERROR, None, error)
