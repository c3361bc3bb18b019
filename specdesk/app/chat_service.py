"""The UI-free chat service: one conversation turn from the customer's text to a stored reply.

A turn, in order (docs/design.md, "One turn, as data"):

1. store the customer message and commit it — invariant 6: it is durable before generation starts;
2. build the prompt: persona system prompt + history, oldest turns dropped to fit the context window;
3. store an empty PENDING reply, then stream from the engine with no database transaction open,
   checkpointing the text so far into that reply about once a second (a crash loses at most that;
   the next start marks the reply interrupted and keeps its text);
4. store the reply with how it ended (complete / stopped / error) and its metrics, free the
   conversation for its next turn, and only then hand out the final update.

Any failure of one turn — bad text, a prompt that cannot fit, an engine or database error, even the
final write failing — ends that turn with a clear error, leaves the conversation usable and never
touches another conversation. Thread-safe: Gradio runs turns on many threads.

Every conversation-level method takes an optional ``agent`` (the signed-in login name): given one, it
acts only on that agent's conversations and raises NotFoundError for anyone else's. ``None`` is the
console with login off: unscoped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from specdesk import prompts
from specdesk.app.auth import console_cache_salt
from specdesk.app.chat_catalog import PersonaCatalog
from specdesk.app.settings import Settings
from specdesk.app.tools import ToolBox
from specdesk.app.tools_service import ToolTurns
from specdesk.app.turns import TurnProgress, TurnState, TurnStream, TurnUpdate, final_state, metrics_dict
from specdesk.db import ChatRepository, ConversationRecord, MessageRecord, NotFoundError, Role
from specdesk.db.tool_repository import ToolRepository
from specdesk.distributed.affinity import routing_scope
from specdesk.engine import SamplingParams

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM
    from specdesk.engine.llm_engine import EngineStats


# How often the streamed text is written into the PENDING reply: a crash loses at most this much.
CHECKPOINT_INTERVAL_S = 1.0
log = logging.getLogger("specdesk")


@dataclass
class _ActiveTurn:
    """What Stop needs to reach a running turn. The request id is None until the engine has it."""

    claimed: bool = False  # a streaming generator owns this turn
    request_id: str | None = None
    stop_requested: bool = False


@dataclass(frozen=True)
class PromptPlan:
    token_ids: list[int]
    num_dropped_messages: int


class ChatService(ToolTurns, PersonaCatalog):
    """Conversations on top of one engine and one repository (the personas' tools: app/tools_service.py; the
    personas and macros: app/chat_catalog.py). Shared by every UI session."""

    def __init__(
        self,
        llm: LLM,
        repository: ChatRepository,
        settings: Settings | None = None,
        *,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
        tools: ToolBox | None = None,
    ) -> None:
        self.llm = llm
        self.repository = repository
        self.tools = tools or ToolBox(ToolRepository(repository.engine))
        self._tool_lock = threading.Lock()
        self.settings = settings or Settings()
        self.checkpoint_interval_s = checkpoint_interval_s
        self._active: dict[int, _ActiveTurn] = {}
        self._lock = threading.Lock()

    # ---- facts about the engine ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.llm.model_name

    @property
    def dtype_name(self) -> str:
        """The weights' dtype ("float32", "bfloat16", ...): greedy outputs are batch-exact in float32 only."""
        return self.llm.dtype_name

    @property
    def speculator_name(self) -> str | None:
        """The configured speculator, or None when every request decodes one token per step."""
        return self.llm.config.speculator

    @property
    def sampling_summary(self) -> str:
        """The deployment's sampling defaults in words (shown under the engine line)."""
        s = self.settings
        return f"temperature {s.temperature:g} · top-p {s.top_p:g} · repetition penalty {s.repetition_penalty:g}"

    @property
    def max_concurrent_turns(self) -> int:
        """How many requests the engine batches at once: the UI queue is sized to this."""
        return self.llm.config.max_num_seqs

    @property
    def context_window(self) -> int:
        """Prompt and reply tokens together, as the engine serves them."""
        return self.llm.max_model_len

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The console's default sampling settings, with per-turn overrides."""
        values: dict[str, Any] = {
            "max_tokens": self.settings.max_tokens,
            "temperature": self.settings.temperature,
            "top_p": self.settings.top_p,
            "repetition_penalty": self.settings.repetition_penalty,
        }
        values.update(overrides)
        return SamplingParams(**values)

    # ---- turns ------------------------------------------------------------------------------------
    def send(
        self, conversation_id: int, text: str, params: SamplingParams | None = None, *, agent: str | None = None
    ) -> TurnStream:
        """Store the customer's `text` (committed now), then return the stream of the drafted reply.

        Raises ValueError (empty or invalid text, a reply already running) and NotFoundError before
        anything is stored; every later failure arrives as a final update with state ERROR. Iterate the
        result to the end or close it: closing it stops the reply and stores the partial text.
        """
        self._check_idle(conversation_id, agent)
        if not text.strip():
            raise ValueError("the customer message is empty: type or paste what the customer wrote")
        self.repository.add_message(conversation_id, Role.USER, text, agent=agent)  # invariant 6: durable first
        return self._stream_turn(conversation_id, params or self.sampling_params())

    def retry(
        self, conversation_id: int, params: SamplingParams | None = None, *, agent: str | None = None,
        last_id: int | None = None,
    ) -> TurnStream:  # fmt: skip
        """Draft the reply to the last customer message again (the previous reply is replaced); after a tool
        result, only what follows it: a run's effects (a ticket) stay, so must its record. last_id: the last
        message as the caller saw it; ValueError, nothing changed, when the conversation has moved on."""
        messages, last_user = self._last_user_message(conversation_id, agent)
        _check_unchanged(last_id, messages[-1].id, "this reply was drafted")
        keep = max([last_user.position] + [m.position for m in messages if m.role is Role.TOOL])
        self.repository.delete_messages_after(conversation_id, keep, agent=agent)
        return self._stream_turn(conversation_id, params or self.sampling_params())

    def edit_last(
        self, conversation_id: int, text: str, params: SamplingParams | None = None, *, agent: str | None = None,
        message_id: int | None = None,
    ) -> TurnStream:  # fmt: skip
        """Replace the last customer message with `text` and draft a new reply to it. message_id: the message
        the edit began from; ValueError, nothing changed, when it is no longer the last customer message, or
        when a tool has run after it (its effects stay, so must the record of what led to them)."""
        if not text.strip():
            raise ValueError("the customer message is empty: type or paste what the customer wrote")
        messages, last_user = self._last_user_message(conversation_id, agent)
        _check_unchanged(message_id, last_user.id, "this edit began")
        if any(m.role is Role.TOOL and m.position > last_user.position for m in messages):
            raise ValueError("a tool has already run on this message: send the correction as a new message")
        self.repository.update_message_content(last_user.id, text, agent=agent)
        self.repository.delete_messages_after(conversation_id, last_user.position, agent=agent)
        return self._stream_turn(conversation_id, params or self.sampling_params())

    def stop(self, conversation_id: int, *, agent: str | None = None) -> bool:
        """Abort the conversation's running turn; its partial reply is stored as stopped.

        Returns False when nothing was running (or the conversation is not ``agent``'s).
        """
        if agent is not None and not self._is_owned(conversation_id, agent):
            return False
        with self._lock:
            turn = self._active.get(conversation_id)
            if turn is None:
                return False
            turn.stop_requested = True
            request_id = turn.request_id
        if request_id is not None:
            self.llm.abort(request_id)
        return True

    def is_running(self, conversation_id: int) -> bool:
        with self._lock:
            return conversation_id in self._active

    def _is_owned(self, conversation_id: int, agent: str) -> bool:
        try:
            self.repository.get_conversation(conversation_id, agent=agent)
        except NotFoundError:
            return False
        return True

    def _check_idle(self, conversation_id: int, agent: str | None) -> None:
        # Ownership first: "still being drafted" would tell another agent the conversation exists.
        if agent is not None and not self._is_owned(conversation_id, agent):
            raise NotFoundError("conversation", conversation_id)
        if self.is_running(conversation_id):
            raise ValueError("a reply is still being drafted in this conversation: stop it first")

    def _stream_turn(self, conversation_id: int, params: SamplingParams) -> TurnStream:
        progress = TurnProgress(conversation_id)
        with self._lock:
            turn = self._active.setdefault(conversation_id, _ActiveTurn())
            is_mine = turn.request_id is None and not turn.stop_requested and not turn.claimed
            turn.claimed = True
        if not is_mine:  # two tabs sent at the same moment: the second one backs off
            yield progress.update(TurnState.ERROR, error="a reply is already being drafted in this conversation")
            return
        try:
            final = yield from self._generate(turn, progress, params)
        except Exception as exc:  # an engine or database failure ends this turn only
            final = progress.update(TurnState.ERROR, error=f"{type(exc).__name__}: {exc}")
        except BaseException:  # GeneratorExit: the browser or Stop closed the stream mid-reply
            self._finish(progress, None)
            raise
        # Stored and released before the final update goes out: whoever sees it may start the next turn.
        yield self._finish(progress, final)

    def _generate(
        self, turn: _ActiveTurn, progress: TurnProgress, params: SamplingParams
    ) -> Generator[TurnUpdate, None, TurnUpdate]:
        """Yield the turn's WAITING and STREAMING updates; return its final update (not yet stored)."""
        conversation_id = progress.conversation_id
        # This turn holds the conversation, so any reply still PENDING in it is a leftover whose final
        # write failed: mark it interrupted (its checkpointed text stays) instead of leaving it hidden.
        self.repository.fail_pending_messages(conversation_id=conversation_id)
        progress.reply_id = self.repository.start_assistant_message(conversation_id).id
        try:
            conversation = self.repository.get_conversation(conversation_id)
            params, progress.tool_mode = self.tool_params(conversation, params)
            plan = self.plan_prompt(conversation, params)
            progress.num_dropped_messages = plan.num_dropped_messages
            # Each agent is a cache tenant of their own (cached pages never reveal another agent's
            # prompts); on a cluster every turn of a conversation goes to the replica holding its pages.
            with routing_scope(f"conversation:{conversation_id}"):
                request_id = self.llm.submit(plan.token_ids, params, cache_salt=console_cache_salt(conversation.agent))
        except ValueError as exc:  # too long, bad parameters: this turn fails, nothing else does
            return progress.update(TurnState.ERROR, error=str(exc))
        with self._lock:
            turn.request_id = request_id
            stop_now = turn.stop_requested
        if stop_now:  # Stop arrived between storing the reply and submitting it
            self.llm.abort(request_id)
        progress.deltas = self.llm.deltas(request_id)
        yield progress.update(TurnState.WAITING)
        for delta in progress.deltas:
            progress.parts.append(delta.text)
            progress.num_tokens += len(delta.token_ids)
            progress.notice = getattr(delta, "notice", None) or progress.notice  # a replica failover's note
            if not delta.finished:
                self._checkpoint(progress)
                yield progress.update(TurnState.STREAMING, delta.text)
                continue
            state = final_state(delta.finish_reason, delta.error)
            metrics = metrics_dict(
                delta.metrics, total_s=progress.elapsed_s(), finish_reason=delta.finish_reason,
                num_dropped_messages=progress.num_dropped_messages, speculate=params.speculate,
            )  # fmt: skip
            error = delta.error or ("the engine failed this request" if state is TurnState.ERROR else None)
            return progress.update(state, delta.text, metrics=metrics, error=error)
        return progress.update(TurnState.ERROR, error="the engine ended the stream without a final update")

    def _checkpoint(self, progress: TurnProgress) -> None:
        """Write the text streamed so far into the PENDING reply, at most once per interval.

        Each checkpoint is its own short transaction; none is open while tokens stream. A failed
        checkpoint only costs durability (logged), never the reply: the final write still comes.
        """
        now = time.perf_counter()
        if progress.reply_id is None or now - progress.checkpointed_at < self.checkpoint_interval_s:
            return
        text = progress.text
        if text == progress.checkpointed_text:
            return  # nothing new (a token that is not text yet): the next text is written at once
        progress.checkpointed_at = now
        try:
            self.repository.save_partial_reply(progress.reply_id, text)
            progress.checkpointed_text = text
        except Exception as exc:
            log.warning("checkpoint of reply %s failed: %s: %s", progress.reply_id, type(exc).__name__, exc)

    def _finish(self, progress: TurnProgress, final: TurnUpdate | None) -> TurnUpdate:
        """End the turn whatever happened: stop the engine request, store the reply, free the conversation.

        Never raises. ``final`` None means the stream was closed mid-reply (stopped). When the reply
        cannot be stored the returned update is an ERROR saying so, with the drafted text in it.
        """
        try:
            close = getattr(progress.deltas, "close", None)
            if close is not None:
                close()  # aborts the engine request if it is still running (frees its pages)
        except Exception as exc:
            log.warning("closing the engine stream failed: %s: %s", type(exc).__name__, exc)
        if final is None:
            final = progress.update(TurnState.STOPPED, metrics={"total_s": round(progress.elapsed_s(), 4)})
        try:
            if progress.reply_id is not None:
                self._store_final(progress, final)
        except Exception as exc:
            final = dataclasses.replace(
                final,
                state=TurnState.ERROR,
                error=f"the reply could not be saved ({type(exc).__name__}: {exc}); copy the text if you need it",
            )
        finally:
            with self._lock:
                self._active.pop(progress.conversation_id, None)  # usable again, whatever failed
        return final

    def _store_final(self, progress: TurnProgress, final: TurnUpdate) -> None:
        assert progress.reply_id is not None
        text, calls = self.split_reply(final, progress.tool_mode)  # a proposed tool call is stored apart
        status, metrics = final.state.message_status, final.metrics or None
        try:
            self.repository.finish_assistant_message(progress.reply_id, text, status, metrics, final.error, calls)
        except ValueError:
            # The text may be what failed (e.g. lone surrogates): keep the reply's fate on record anyway.
            self.repository.finish_assistant_message(
                progress.reply_id, "", status, metrics, final.error or "not storable"
            )

    # ---- prompts -----------------------------------------------------------------------------------
    def plan_prompt(self, conversation: ConversationRecord, params: SamplingParams) -> PromptPlan:
        """Token ids for the reply to `conversation`, oldest turns dropped to leave room for the reply.

        Raises ValueError (prompts.ContextOverflowError) when even the last customer message cannot fit.
        """
        messages = self.prompt_messages(conversation)  # with the persona's tools, if it has any
        # Room for the reply: at most max_tokens, and never less than a quarter of the window.
        reserve = min(params.max_tokens, self.context_window // 4)
        budget = self.context_window - max(reserve, 1)
        counted: dict[int, list[int]] = {}

        def count_tokens(candidate: list[dict[str, str]]) -> int:
            ids = self.llm.apply_chat_template(candidate)
            counted[len(candidate)] = ids
            return len(ids)

        kept, num_dropped = prompts.fit_to_context(messages, count_tokens, budget)
        ids = counted.get(len(kept)) or self.llm.apply_chat_template(kept)
        return PromptPlan(ids, num_dropped)

    def _last_user_message(
        self, conversation_id: int, agent: str | None
    ) -> tuple[tuple[MessageRecord, ...], MessageRecord]:
        """The conversation's messages and its last customer message, once no reply is being drafted in it."""
        self._check_idle(conversation_id, agent)
        messages = self.repository.get_conversation(conversation_id, agent=agent).messages
        for message in reversed(messages):
            if message.role is Role.USER:
                return messages, message
        raise ValueError("this conversation has no customer message yet")

    # ---- conversations, personas and macros ---------------------------------------------------------
    def new_conversation(
        self, persona: str = "general", customer_name: str = "", *, agent: str | None = None
    ) -> ConversationRecord:
        """An empty conversation answered with `persona`'s system prompt (KeyError for an unknown one)."""
        prompts.render_system_prompt(persona)  # fail now, not at the first turn
        return self.repository.create_conversation(customer_name=customer_name, persona=persona, agent=agent)

    def add_agent_reply(self, conversation_id: int, text: str, *, agent: str | None = None) -> MessageRecord:
        """Store a reply the agent wrote or inserted from a macro (no generation)."""
        self._check_idle(conversation_id, agent)
        if not text.strip():
            raise ValueError("the reply is empty")
        return self.repository.add_message(conversation_id, Role.ASSISTANT, text, agent=agent)

    def engine_stats(self) -> EngineStats:
        return self.llm.stats()

    def set_feedback(self, message_id: int, rating: int | None, *, agent: str | None = None) -> None:
        """Thumbs up (+1), down (-1) or cleared (None) on a drafted reply."""
        if rating is None:
            self.repository.clear_feedback(message_id, agent=agent)
        else:
            self.repository.set_feedback(message_id, rating, agent=agent)


def _check_unchanged(seen: int | None, now: int, since: str) -> None:
    # A stale tab's Redraft or Save would otherwise rewrite a message it never showed (another tab's).
    if seen is not None and seen != now:
        raise ValueError(f"this conversation has changed since {since} (another tab or window): open it again")
