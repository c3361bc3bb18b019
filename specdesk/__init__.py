"""SpecDesk: a customer-care chat console on an in-process LLM engine (paged KV cache, prefix reuse,
speculative decoding with an MLP speculator).

`from specdesk import LLM, SamplingParams` is the engine's public API; `specdesk.langchain.ChatSpecDesk`
the LangChain chat model; `specdesk serve` (`specdesk.app.cli`) the console, `/v1` and `/metrics`.
"""

from typing import TYPE_CHECKING

from specdesk.engine.outputs import FinishReason, RequestMetrics, RequestOutput, StreamDelta, TokenLogprob
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.structured_output import StructuredOutput

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM

__all__ = [
    "LLM",
    "FinishReason",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
    "StructuredOutput",
    "TokenLogprob",
]


def __getattr__(name: str) -> object:
    # LLM pulls in torch and transformers; import it lazily so `import specdesk` stays cheap.
    if name == "LLM":
        from specdesk.engine.llm import LLM

        return LLM
    raise AttributeError(name)
