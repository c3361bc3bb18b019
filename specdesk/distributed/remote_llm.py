"""`RemoteLLM`: the `LLM` interface the app uses, served by engine replicas on Ray Serve.

The front end renders prompts itself (the replicas send it their tokenizer once) and sends each turn
the full prompt; every request carries a routing key (distributed/affinity.py) as Ray Serve's session
id, so `AffinityRouter` sends a conversation's turns to the replica that holds its cached pages.

Failure: when a replica dies mid-reply, the request is retried once on another replica, continuing
from the prompt plus the tokens already streamed (greedy output is unchanged by the interruption). The
deltas after a failover are `FailoverDelta`s whose `notice` says what happened, for the UI to show;
if the retry fails too, the final delta carries the error and the caller keeps the partial text.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from specdesk.distributed import affinity
from specdesk.distributed.replica import ReplicaDelta, ReplicaInfo
from specdesk.distributed.stats import sum_stats, with_retired
from specdesk.engine.client import EngineClient, Prompt, check_logit_bias, check_prompt_ids, render_chat
from specdesk.engine.detokenizer import IncrementalDetokenizer
from specdesk.engine.grammar import GrammarCompiler
from specdesk.engine.llm_engine import EngineStats
from specdesk.engine.outputs import FinishReason, StreamDelta
from specdesk.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


# How many times a failover may be re-routed when the replacement choice dies before its first delta
# (the router may not yet know the first replica is gone); the reply itself is retried once.
MAX_REROUTES = 3


@dataclass
class FailoverDelta(StreamDelta):
    """A delta produced after the request moved to another replica; `notice` says why, for the UI."""

    notice: str | None = None


@dataclass(frozen=True)
class _EngineFacts:
    """Stand-in for `LLM.config` / `LLM.loaded` where the app still reads them."""

    name: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    speculator: str | None


class RemoteLLM(EngineClient):
    """An `LLM` look-alike whose engine runs in Ray Serve replicas. Thread-safe, like `LLM`."""

    def __init__(self, handle: Any, info: ReplicaInfo, tokenizer: Any, *, num_replicas: int = 1) -> None:
        self._handle = handle
        self.info = info
        self.tokenizer = tokenizer
        self._num_replicas = num_replicas
        self._keys = affinity.PromptKeys()
        self._requests: dict[str, _RemoteRequest] = {}
        self._stats: dict[str, EngineStats] = {}
        self._retired: EngineStats | None = None  # the counters of replicas that died
        self._dead: set[str] = set()
        self._listeners: list[Callable[[StreamDelta], None]] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._grammars: GrammarCompiler | None = None  # validates structured-output specs at submit
        self._error: str | None = None

    @classmethod
    async def connect(cls, handle: Any, *, num_replicas: int = 1) -> RemoteLLM:
        """Ask one replica for the engine's facts and tokenizer (from async code, e.g. a Serve replica)."""
        info = await handle.info.remote()
        tokenizer = await handle.tokenizer.remote()
        return cls(handle, info, tokenizer, num_replicas=num_replicas)

    # ---- what the app may know about the engine ----------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.info.model_name

    @property
    def dtype_name(self) -> str:
        return self.info.dtype_name

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def error(self) -> str | None:
        """None while replicas answer; otherwise why the last request found none (clears on success)."""
        return self._error

    @property
    def config(self) -> _EngineFacts:
        return self._facts()

    @property
    def loaded(self) -> _EngineFacts:
        return self._facts()

    def _facts(self) -> _EngineFacts:
        i = self.info
        # Every replica batches max_num_seqs requests: the front end may keep all of them busy.
        return _EngineFacts(
            i.model_name, i.dtype_name, i.max_model_len, i.max_num_seqs * self._num_replicas, i.speculator
        )

    # ---- prompts (rendered here, as the in-process LLM renders them: client.render_chat) -------------
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render messages for the assistant's reply, and remember the conversation's routing key."""
        ids = self._render(messages)
        self._keys.remember(ids, affinity.conversation_key(messages, self._render))
        return ids

    def _render(self, messages: list[dict[str, Any]]) -> list[int]:
        return render_chat(self.tokenizer, messages, self.model_name)

    def routing_key(self, token_ids: Sequence[int], cache_salt: str | None = None) -> str:
        """The key a prompt is routed by: the caller's (`affinity.routing_scope`), else the
        conversation's (a prompt this client rendered), else the prompt's first pages."""
        key = affinity.scoped_routing_key()
        if key is None:
            key = self._keys.lookup(token_ids) or affinity.plain_key(token_ids, self.info.block_size)
        return affinity.salted(key, cache_salt)

    # ---- serving ----------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, cache_salt: str | None = None) -> str:
        """Send a request to its replica and return its id; its deltas arrive through `deltas(request_id)`."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self._check_prompt(ids)
        self._check_params(params)
        if self._closed:
            raise RuntimeError("the engine is shut down")
        request_id = f"remote-{next(self._ids)}"
        request = _RemoteRequest(self, request_id, ids, params, cache_salt, self.routing_key(ids, cache_salt))
        with self._lock:
            self._requests[request_id] = request
        request.start()
        return request_id

    def _check_prompt(self, token_ids: list[int]) -> None:
        check_prompt_ids(token_ids, self.max_model_len, self.info.vocab_size)

    def _check_params(self, params: SamplingParams) -> None:
        """What the in-process engine refuses at submit, refused here too (a replica would fail the request
        only once it runs: a 500 for what is the caller's 400)."""
        check_logit_bias(params, self.info.vocab_size)
        if params.structured_output is not None:
            with self._lock:
                if self._grammars is None:  # validation only: which token ends the output does not matter
                    self._grammars = GrammarCompiler(self.tokenizer, [self.tokenizer.eos_token_id or 0])
            self._grammars.compile(params.structured_output)

    def _discard(self, request_id: str) -> bool:
        with self._lock:
            return self._requests.pop(request_id, None) is not None

    def abort(self, request_id: str) -> None:
        with self._lock:
            request = self._requests.get(request_id)
        if request is not None:
            request.abort()

    def deltas(self, request_id: str) -> Iterator[StreamDelta]:
        """The deltas of a submitted request until its final one. Closing the iterator early aborts it."""
        request = self._requests[request_id]
        finished = False
        try:
            while not finished:
                delta = request.out.get()
                finished = delta.finished
                yield delta
        finally:
            with self._lock:
                self._requests.pop(request_id, None)
            if not finished:
                request.abort()

    def stats(self) -> EngineStats:
        """The sum over live replicas of the stats each sent with its latest finished request (never blocks:
        /metrics calls this on the event loop)."""
        with self._lock:
            return with_retired(sum_stats(list(self._stats.values())), self._retired)

    def add_listener(self, fn: Callable[[StreamDelta], None]) -> None:
        """Call fn(delta) for every delta of every request, on the thread that receives it."""
        self._listeners.append(fn)

    def reset_prefix_cache(self) -> None:
        raise NotImplementedError("reset_prefix_cache reaches one engine; restart the replicas to reset all")

    def forget_replies(self) -> None:
        raise NotImplementedError("forget_replies reaches one engine; restart the replicas to reset all")

    def shutdown(self) -> None:
        """Abort every live request; the replicas belong to Ray Serve and stay up."""
        self._closed = True
        with self._lock:
            live = list(self._requests.values())
        for request in live:
            request.abort()

    # ---- called by the requests' pump threads -------------------------------------------------------
    def _deliver(self, request: _RemoteRequest, delta: StreamDelta) -> None:
        for fn in self._listeners:
            fn(delta)
        request.out.put(delta)

    def _record(self, replica: str, stats: EngineStats | None) -> None:
        with self._lock:
            self._error = None
            if stats is not None and replica not in self._dead:
                self._stats[replica] = stats

    def _mark_dead(self, replica: str | None, error: str) -> None:
        with self._lock:
            if replica is not None:
                self._dead.add(replica)
                last = self._stats.pop(replica, None)
                if last is not None:  # its counters stay counted (with_retired); its gauges go with it
                    self._retired = with_retired(last, self._retired)
            self._error = error


class _RemoteRequest:
    """One request's remote stream, read by a pump thread into `out` (a queue, like `LLM`'s streams)."""

    def __init__(
        self, llm: RemoteLLM, request_id: str, ids: list[int], params: SamplingParams,
        cache_salt: str | None, routing_key: str,
    ) -> None:  # fmt: skip
        self.llm, self.request_id, self.ids, self.params = llm, request_id, ids, params
        self.cache_salt, self.routing_key = cache_salt, routing_key
        self.out: queue.Queue[StreamDelta] = queue.Queue()
        self.replicas: list[str] = []  # every replica that served a part of the reply, in order
        self._response: Any = None
        self._aborted = False
        self._emitted = ""  # the reply's text as streamed so far
        self._detokenizer: IncrementalDetokenizer | None = None  # after a failover: the reply's own text
        self._lock = threading.Lock()

    def start(self) -> None:
        self._call(self.ids, self.params)
        threading.Thread(target=self._pump, name=f"specdesk-{self.request_id}", daemon=True).start()

    def _call(self, ids: list[int], params: SamplingParams, output_prefix: list[int] | None = None) -> None:
        handle = self.llm._handle.options(stream=True, session_id=self.routing_key)
        with self._lock:
            # Only a retry passes the prefix, so a first call works with any replica version.
            args = (ids, params, self.cache_salt) + ((output_prefix,) if output_prefix else ())
            self._response = handle.generate.remote(*args)
            if self._aborted:
                self._response.cancel()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._response is not None:
                self._response.cancel()  # Ray cancels the replica's generator, which aborts the engine request

    def _pump(self) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, TaskCancelledError

        generated: list[int] = []
        notice: str | None = None
        num_failovers = num_reroutes = 0
        while True:
            replica: str | None = None
            try:
                for item in self._response:
                    rd: ReplicaDelta = item
                    replica = rd.replica
                    if not self.replicas or self.replicas[-1] != replica:
                        self.replicas.append(replica)
                    self.llm._record(replica, rd.stats)
                    generated += rd.delta.token_ids
                    if self._emit(rd.delta, notice):
                        return
                self._finish(FinishReason.ERROR, "the replica ended the stream without a final delta", notice)
                return
            except TaskCancelledError:  # aborted (Serve's RequestCancelledError is one too)
                self._finish(FinishReason.ABORT, None, notice)
                return
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                self.llm._mark_dead(replica or (self.replicas[-1] if self.replicas else None), str(exc))
                rerouted = replica is None and num_failovers > 0 and num_reroutes < MAX_REROUTES
                if self._aborted or (num_failovers >= 1 and not rerouted):
                    why = "stopped" if self._aborted else f"the retry failed too: {type(exc).__name__}"
                    self._finish(FinishReason.ABORT if self._aborted else FinishReason.ERROR,
                                 None if self._aborted else why, notice)  # fmt: skip
                    return
                num_reroutes += rerouted
                num_failovers = 1
                self._detokenizer = IncrementalDetokenizer(self.llm.tokenizer, [], self.params)
                self._detokenizer.add(list(generated))
                notice = (
                    f"The engine replica serving this reply stopped after {len(generated)} tokens; "
                    "the reply was continued on another replica."
                )
                log.warning("request %s: %s (%s)", self.request_id, notice, exc)
                left = self.params.max_tokens - len(generated)
                if left <= 0 or len(self.ids) + len(generated) >= self.llm.max_model_len:
                    self._finish(FinishReason.LENGTH, None, notice)
                    return
                time.sleep(0.05)  # lets the router hear of the death before it routes the retry
                # The reply so far goes as the new request's output, not its prompt: the grammar advances over it,
                # output penalties count it, and the continuation is what one replica would have written.
                self._call(self.ids, self.params, list(generated))
            except Exception as exc:  # no replica at all, a serialization bug: this request fails alone
                self.llm._mark_dead(None, f"{type(exc).__name__}: {exc}")
                self._finish(FinishReason.ERROR, f"{type(exc).__name__}: {exc}", notice)
                return

    def _emit(self, delta: StreamDelta, notice: str | None) -> bool:
        """Deliver one replica delta as this request's; True when it is the final one."""
        delta = dataclasses.replace(delta, request_id=self.request_id)
        if self._detokenizer is not None:
            # The retry's replica decodes its tokens without the ones before them (a character cut at the
            # seam would garble, a stop string across it would be missed): decode the whole reply here.
            detok = self._detokenizer
            detok.add(delta.token_ids)
            if detok.stopped_by is not None:
                delta.token_ids = delta.token_ids[: detok.num_tokens_before_stop]
                if delta.logprobs is not None:
                    delta.logprobs = delta.logprobs[: detok.num_tokens_before_stop]
                if not delta.finished:
                    self._response.cancel()  # the replica frees the request's pages
                delta.finished, delta.finish_reason = True, FinishReason.STOP
            elif delta.finished:
                detok.flush()
            delta.text = detok.text[len(self._emitted) :]
        self._emitted += delta.text
        if notice is not None:  # the retry's metrics count the whole reply: it took the rest as output_prefix
            delta = FailoverDelta(**{f.name: getattr(delta, f.name) for f in dataclasses.fields(delta)}, notice=notice)
        self.llm._deliver(self, delta)
        return delta.finished

    def _finish(self, reason: FinishReason, error: str | None, notice: str | None) -> None:
        delta = StreamDelta(self.request_id, "", [], True, reason, None, error)
        if notice is not None:
            delta = FailoverDelta(**{f.name: getattr(delta, f.name) for f in dataclasses.fields(delta)}, notice=notice)
        self.llm._deliver(self, delta)
