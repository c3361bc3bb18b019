"""prompts: system prompts, personas, tones, macros and conversation datasets as text files.

The Python here only loads and renders them (langchain-core templates) and fits a conversation into
the model's context window.
"""

from specdesk.prompts.context import ContextOverflowError, fit_to_context
from specdesk.prompts.loader import (
    ChatMessage,
    DatasetEntry,
    PromptInfo,
    PromptVariables,
    build_messages,
    chat_prompt_template,
    list_macros,
    list_personas,
    list_prompts,
    list_tones,
    load_conversations,
    load_dataset,
    render_macro,
    render_system_prompt,
    system_prompt_template,
)

__all__ = [
    "ChatMessage",
    "ContextOverflowError",
    "DatasetEntry",
    "PromptInfo",
    "PromptVariables",
    "build_messages",
    "chat_prompt_template",
    "fit_to_context",
    "list_macros",
    "list_personas",
    "list_prompts",
    "list_tones",
    "load_conversations",
    "load_dataset",
    "render_macro",
    "render_system_prompt",
    "system_prompt_template",
]
