"""The engine loop: schedule → run → postprocess, one step at a time. Single-threaded by design;
engine/llm.py drives it from one background thread and hands results to callers' threads.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from specdesk.engine.block_manager import BlockManager
from specdesk.engine.client import check_logit_bias, check_prompt_ids
from specdesk.engine.config import EngineConfig, SpecConfig
from specdesk.engine.detokenizer import IncrementalDetokenizer
from specdesk.engine.grammar import GrammarCompiler, GrammarState
from specdesk.engine.grammar.state import MAX_FORCED_TOKENS
from specdesk.engine.model_runner import ModelRunner
from specdesk.engine.models.loader import LoadedModel
from specdesk.engine.outputs import FinishReason, StreamDelta, TokenLogprob
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from specdesk.engine.sequence import Sequence
from specdesk.engine.speculators.decoder import SpecStats, SpeculativeDecoder
from specdesk.engine.speculators.verifier import Verdict, verify_step


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_evicted_blocks: int
    kv_usage: float
    prefix_hit_tokens: int
    prefix_queried_tokens: int
    num_preemptions: int
    num_steps: int
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)
    spec_verify_cost_per_token: float = 0.0  # measured cost of one more verified token, in plain steps
    spec_num_tree_nodes: int = 0  # draft nodes verified (candidate trees share prefixes)
    grammar_num_forced_tokens: int = 0  # jump-forward: tokens a grammar forced, appended without a model step
    grammar_s: float = 0.0  # time spent in grammar masks, pruning, advancing and jump-forward

    @property
    def spec_mean_acceptance_length(self) -> float:
        return 1 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0


class LLMEngine:
    """Holds the scheduler, the page pool and the model runner; `step()` advances every request once."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(config, loaded)
        try:  # an engine that fails to build gives back what its runner took
            self.max_model_len = self.runner.max_model_len
            self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
            self.scheduler = Scheduler(
                self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
            )
            self.spec_config = SpecConfig.resolve(config, loaded.device.type)
            self.speculation = (
                SpeculativeDecoder(self.spec_config, loaded, self.runner) if self.spec_config is not None else None
            )
            self.runner.capture_graphs(
                max_tree_nodes=self.speculation.max_tree_nodes if self.speculation is not None else 0,
                max_spec_batch=self.speculation.config.max_batch_size if self.speculation is not None else 0,
            )
            # Structured output; llguidance and its view of the tokenizer are loaded by the first such request.
            self.grammar_compiler = GrammarCompiler(self.tokenizer, loaded.eos_token_ids)
            self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="specdesk-grammar")  # masks during a pass
            self.detokenizers: dict[str, IncrementalDetokenizer] = {}
            self.sequences: dict[str, Sequence] = {}
            self.num_steps = 0
            self._step_started = 0.0  # perf_counter at the current step's start
            self._ids = itertools.count()
        except BaseException:
            self.runner.close()
            raise

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a prompt this engine can never serve."""
        check_prompt_ids(prompt_token_ids, self.max_model_len, self.loaded.vocab_size)
        if self.block_manager.blocks_needed(len(prompt_token_ids) + 1) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens but the KV cache holds only "
                f"{self.block_manager.num_blocks * self.config.block_size}: raise kv_cache_memory_gib"
            )

    def check_params(self, params: SamplingParams) -> None:
        """Raise ValueError for parameters this model cannot honour (OpenAI's and vLLM's 400s)."""
        check_logit_bias(params, self.loaded.vocab_size)

    def compile_grammar(self, params: SamplingParams) -> GrammarState | None:
        """The request's grammar at the start of its output (None: free text); ValueError for a bad spec.

        Thread-safe: a client calls it in its own thread first, so a bad spec fails there and the compiled
        grammar is cached for `add_request`."""
        if params.structured_output is None:
            return None
        return self.grammar_compiler.compile(params.structured_output)

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        cache_salt: str | None = None, output_prefix: list[int] | None = None,
    ) -> str:  # fmt: skip
        """Queue a request. `output_prefix`: tokens of its reply already generated elsewhere (a replica that
        died mid-reply): they count as output (max_tokens, output penalties, the grammar advances over them)
        but are not streamed again; generation continues after them as if it had never stopped."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        check_cache_salt(cache_salt)
        params.validate()
        prompt_token_ids = list(prompt_token_ids)
        self.validate_prompt(prompt_token_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_params(params)
        grammar = self.compile_grammar(params)  # a bad spec fails here, never inside the loop
        prefix = list(output_prefix or [])
        if prefix:  # the prompt is checked above; with the prefix it must still fit and hold known ids
            check_prompt_ids(prompt_token_ids + prefix, self.max_model_len, self.loaded.vocab_size)
            if len(prefix) >= params.max_tokens:
                raise ValueError(f"output_prefix has {len(prefix)} tokens, max_tokens is {params.max_tokens}")
            if grammar is not None:
                grammar.advance(prefix)  # ValueError: the prefix is not a reply this grammar allows
                if grammar.is_terminated:  # nothing left to generate: no step would ever finish it
                    raise ValueError("output_prefix already completes the structured output")
        seq = Sequence(request_id, prompt_token_ids, params, frozenset(self.loaded.eos_token_ids), cache_salt)
        seq.token_ids += prefix
        seq.grammar = grammar
        seq.metrics.arrival_time = time.perf_counter()
        self.sequences[request_id] = seq
        # The prefix is decoding context, not new text: the stream starts after it.
        self.detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids + prefix, params)
        self.scheduler.add(seq)
        return request_id

    def forget_replies(self) -> None:
        """Empty the n-gram speculator's store of finished replies (no-op without one)."""
        if self.speculation is not None and self.speculation.ngram is not None:
            self.speculation.ngram.clear_replies()

    def abort(self, request_id: str) -> StreamDelta | None:
        seq = self.scheduler.abort(request_id)
        return self._finish_delta(seq) if seq is not None else None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[StreamDelta]:
        """One engine iteration. Returns a delta for every request that produced text or finished."""
        self._step_started = time.perf_counter()
        if self.speculation is not None:
            self.speculation.propose(self.scheduler.running, self.block_manager.usage)
        batch = self.scheduler.schedule()
        # A sequence finished while scheduling found no pages even with nothing else running.
        deltas = [self._finish_delta(s, error=self._no_room(s)) for s in batch.preempted if s.is_finished]
        if self.speculation is not None:
            for seq in batch.preempted:
                self.speculation.preempted(seq)
        if batch.is_empty:
            return deltas
        self.num_steps += 1
        self._prefetch_masks(batch)
        try:
            verdicts = self._run(batch)
        except Exception as exc:  # a failed pass fails its requests, never the engine
            error = f"{type(exc).__name__}: {exc}"
            verdicts = [Verdict([], error=error) for _ in batch.scheduled]
        now = time.perf_counter()
        for s, verdict in zip(batch.scheduled, verdicts, strict=True):
            failure = verdict.error
            if failure is None:
                try:
                    deltas += self._append(s, verdict.tokens, now, verdict.logprobs)
                    continue
                except Exception as exc:  # appending failed: as a failed pass, this request's alone
                    failure = f"{type(exc).__name__}: {exc}"
            # This request alone failed; the others carry on, and the deltas they already have stay theirs.
            if not s.seq.is_finished:
                self.scheduler.finish(s.seq, FinishReason.ERROR)
            deltas.append(self._finish_delta(s.seq, error=failure))
        return deltas

    def _append(
        self, s: ScheduledSeq, new_tokens: list[int], now: float, logprobs: list[TokenLogprob] | None = None
    ) -> list[StreamDelta]:
        seq = s.seq
        was_decoding = seq.num_output_tokens > 0
        try:
            forced = self._follow_grammar(seq, new_tokens)
        except Exception as exc:  # e.g. a token the grammar forbids got through: this request alone fails
            self.scheduler.finish(seq, FinishReason.ERROR)
            return [self._finish_delta(seq, error=f"grammar: {type(exc).__name__}: {exc}")]
        kept = self.scheduler.append_tokens(s, new_tokens + forced, len(forced))
        if forced:
            self.grammar_compiler.stats.num_forced_tokens += max(0, len(kept) - len(new_tokens))
        if seq.grammar is not None and seq.grammar.is_terminated and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP)  # the output is complete (a request ignoring EOS)
        if not kept:  # finished without a new token (its grammar ended): still the one final delta
            return [self._finish_delta(seq)] if seq.is_finished else []
        m = seq.metrics
        m.num_generated_tokens = seq.num_output_tokens
        if was_decoding:
            m.num_decode_steps += 1
        if m.first_token_time is None:
            m.first_token_time = now
            m.ttft_s = now - m.arrival_time
        m.decode_s = now - m.first_token_time
        return [self._text_delta(seq, kept, logprobs[: len(kept)] if logprobs is not None else None)]

    def _prefetch_masks(self, batch: SchedulerOutput) -> None:
        """Start every constrained sequence's masks for this pass in a worker thread, to overlap the model."""
        for s in batch.scheduled:
            if s.samples and s.seq.grammar is not None:
                tree = self.speculation.tree_for(s) if self.speculation is not None else None
                s.seq.grammar.prefetch(tree, self.loaded.vocab_size, self._grammar_pool)

    def _follow_grammar(self, seq: Sequence, new_tokens: list[int]) -> list[int]:
        """Advance the request's grammar over its verified tokens; return the tokens it forces next.

        Jump-forward: a forced token is the grammar's only choice, so plain decoding would emit it too;
        appended without a model step, its KV is computed next step as a short chunk (the sequence does not
        speculate that step). Off with speculate=False (plain decoding, side by side) and with logprobs (a
        forced token has no distribution of the model's to report)."""
        grammar = seq.grammar
        if grammar is None or not new_tokens:
            return []
        grammar.advance(new_tokens)
        p = seq.params
        room = min(MAX_FORCED_TOKENS, p.max_tokens - seq.num_output_tokens - len(new_tokens))
        if not p.speculate or p.logprobs is not None or room <= 0:
            return []
        forced = grammar.forced_tokens(room)
        grammar.advance(forced)
        return forced

    def fail_all(self, error: str) -> list[StreamDelta]:
        """Finish every live request with an error (the loop's last resort after an unexpected exception)."""
        live = [*self.scheduler.running, *self.scheduler.waiting]
        for seq in live:
            self.scheduler.finish(seq, FinishReason.ERROR)
        return [self._finish_delta(seq, error=error) for seq in live]

    def close(self) -> None:
        """Give back what the engine took from the process (the runner's threads, the grammar thread); the
        engine serves no more."""
        self._grammar_pool.shutdown(wait=False)
        self.runner.close()

    def _run(self, batch: SchedulerOutput) -> list[Verdict]:
        """One base-model pass: plain sequences sample one token, speculating ones verify their tree."""
        scheduled = batch.scheduled
        spec = self.speculation
        trees = [spec.tree_for(s) if spec is not None else None for s in scheduled]
        out = self.runner.execute(scheduled, trees)
        verdicts = verify_step(scheduled, trees, out, self.runner.generator_for)
        if spec is not None:
            spec.accept(scheduled, trees, verdicts, out)
            lone = scheduled[0] if len(scheduled) == 1 else None
            if lone is not None and lone.num_new_tokens == 1:
                # A lone decode step (the verdicts are on the host, so the pass is done): what one more
                # verified token costs, for the tree-width choice. Timed from the step's start, proposal
                # included: the width trades a token's cost against the whole step's, not the pass alone's.
                seconds = time.perf_counter() - self._step_started
                spec.record_lone_step(1 + lone.num_draft_tokens, len(verdicts[0].tokens), seconds)
        return verdicts

    def _no_room(self, seq: Sequence) -> str:
        bm = self.block_manager
        return (
            f"the KV cache holds {bm.num_blocks * self.config.block_size} tokens, too few for this request's "
            f"{seq.num_tokens} and the next: raise kv_cache_memory_gib or lower max_tokens"
        )

    def _text_delta(self, seq: Sequence, kept: list[int], logprobs: list[TokenLogprob] | None) -> StreamDelta:
        detok = self.detokenizers[seq.request_id]
        text = detok.add(kept)
        if detok.stopped_by is not None:
            # A stop string ended the text: drop the ids after the one that completed it, and finish.
            n = detok.num_tokens_before_stop
            assert n is not None, seq.request_id
            if n < len(kept):
                del seq.token_ids[n - len(kept) :]
                kept = kept[:n]
                logprobs = logprobs[:n] if logprobs is not None else None
                seq.metrics.num_generated_tokens = seq.num_output_tokens
            if seq.is_finished:
                seq.finish_reason = FinishReason.STOP
            else:
                self.scheduler.finish(seq, FinishReason.STOP)
        if seq.is_finished:
            if detok.stopped_by is None:
                text += detok.flush()
                if detok.stopped_by is not None:  # the held-back tail completed a stop string
                    seq.finish_reason = FinishReason.STOP
            return self._finish_delta(seq, text=text, token_ids=kept, logprobs=logprobs)
        return StreamDelta(seq.request_id, text, kept, logprobs=logprobs)

    def _finish_delta(
        self, seq: Sequence, text: str = "", token_ids: list[int] | None = None, error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> StreamDelta:  # fmt: skip
        self.sequences.pop(seq.request_id, None)
        detok = self.detokenizers.pop(seq.request_id, None)
        if detok is not None and token_ids is None:  # ended without new ids (abort, error): what it held back
            text += detok.flush()
        if self.speculation is not None:
            self.speculation.finish(seq)
        seq.metrics.finish_time = time.perf_counter()
        return StreamDelta(seq.request_id, text, token_ids or [], True, seq.finish_reason, seq.metrics, error, logprobs)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        spec = self.speculation.stats if self.speculation is not None else SpecStats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            num_evicted_blocks=bm.num_evicted_blocks,
            kv_usage=bm.usage,
            prefix_hit_tokens=bm.num_hit_tokens,
            prefix_queried_tokens=bm.num_queried_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            spec_num_drafts=spec.num_drafts,
            spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
            spec_accepted_per_position=list(spec.accepted_per_position),
            spec_verify_cost_per_token=self.speculation.step_cost.cost_per_token if self.speculation else 0.0,
            spec_num_tree_nodes=spec.num_tree_nodes,
            grammar_num_forced_tokens=self.grammar_compiler.stats.num_forced_tokens,
            grammar_s=self.grammar_compiler.stats.busy_s,
        )


def check_cache_salt(cache_salt: object) -> None:
    """ValueError unless a cache salt is a string or None (anything else failed inside the engine's step)."""
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
