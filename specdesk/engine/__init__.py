"""SpecDesk's in-process LLM engine: paged KV cache, prefix reuse, continuous batching, speculation."""

from typing import TYPE_CHECKING

from specdesk.engine.outputs import FinishReason, RequestMetrics, RequestOutput, StreamDelta
from specdesk.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from specdesk.engine.llm import LLM

__all__ = ["LLM", "FinishReason", "RequestMetrics", "RequestOutput", "SamplingParams", "StreamDelta"]


def __getattr__(name: str) -> object:
    # LLM pulls in torch and transformers; import it lazily so `import specdesk.engine` stays cheap.
    if name == "LLM":
        from specdesk.engine.llm import LLM

        return LLM
    raise AttributeError(name)
