"""Load the prompt text files and render them with langchain-core templates.

Layout (all plain text, edited without touching Python):

* ``personas/<key>.txt`` — a support agent's system prompt for one domain (retail, telecom, ...);
* ``tones/<key>.txt`` — an optional paragraph appended to the system prompt (warm, concise, ...);
* ``macros/<key>.txt`` — canned replies the agent can insert;
* ``train/conversations.jsonl`` and ``eval/conversations.jsonl`` — customer conversations, one JSON
  object per line: ``{"id", "domain", "intent", "tone", "messages": [{"role", "content"}, ...]}``.

``session_details.txt`` closes every system prompt with the per-deployment and per-customer values.

Each template file starts with a ``# Title`` line (shown in the UI) followed by the template body.
Templates may use only ``{company}``, ``{agent_name}`` and ``{customer_name}``; anything the agent
must fill in by hand is written in square brackets, e.g. ``[order number]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from langchain_core.messages import BaseMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder, PromptTemplate

PROMPTS_DIR = Path(__file__).resolve().parent
VARIABLES = ("company", "agent_name", "customer_name")

Kind = Literal["personas", "tones", "macros"]
Split = Literal["train", "eval"]
ChatMessage = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


@dataclass(frozen=True)
class PromptVariables:
    """Values for the template variables. An unknown customer name reads naturally in both places."""

    company: str = "Northwind"
    agent_name: str = "Alex"
    customer_name: str | None = None

    def for_system_prompt(self) -> dict[str, str]:
        return {
            "company": self.company,
            "agent_name": self.agent_name,
            "customer_name": self.customer_name or "not given",
        }

    def for_macro(self) -> dict[str, str]:
        return {
            "company": self.company,
            "agent_name": self.agent_name,
            "customer_name": self.customer_name or "there",
        }


@dataclass(frozen=True)
class PromptInfo:
    key: str  # file name without .txt; what db stores as a conversation's persona
    title: str


@dataclass(frozen=True)
class DatasetEntry:
    id: str
    domain: str
    intent: str
    tone: str
    messages: tuple[ChatMessage, ...]

    @property
    def num_user_turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)


def list_prompts(kind: Kind) -> list[PromptInfo]:
    """Every template of one kind, sorted by key."""
    return [PromptInfo(key, _read_template(kind, key)[0]) for key in _keys(kind)]


def list_personas() -> list[PromptInfo]:
    return list_prompts("personas")


def list_tones() -> list[PromptInfo]:
    return list_prompts("tones")


def list_macros() -> list[PromptInfo]:
    return list_prompts("macros")


def system_prompt_template(persona: str, tone: str | None = None) -> PromptTemplate:
    """Persona, then the optional tone, then the session details, as one langchain PromptTemplate.

    The order is deliberate: the engine caches KV pages by prefix, so text shared by the most
    conversations comes first and the customer's name comes last.
    """
    parts = [_read_template("personas", persona)[1]]
    if tone:
        parts.append(_read_template("tones", tone)[1])
    parts.append(_read_file(PROMPTS_DIR / "session_details.txt")[1])
    return PromptTemplate.from_template("\n\n".join(parts))


def render_system_prompt(persona: str, tone: str | None = None, variables: PromptVariables | None = None) -> str:
    return system_prompt_template(persona, tone).format(**(variables or PromptVariables()).for_system_prompt())


def render_macro(key: str, variables: PromptVariables | None = None) -> str:
    """A canned reply with the variables filled in; ``[bracketed]`` parts are for the agent to edit."""
    template = PromptTemplate.from_template(_read_template("macros", key)[1])
    return template.format(**(variables or PromptVariables()).for_macro())


def chat_prompt_template(persona: str, tone: str | None = None) -> ChatPromptTemplate:
    """System prompt followed by a ``history`` placeholder (history text is never template-formatted)."""
    system = system_prompt_template(persona, tone).template
    return ChatPromptTemplate.from_messages([("system", system), MessagesPlaceholder("history")])


def build_messages(
    persona: str,
    history: Sequence[Mapping[str, str]],
    tone: str | None = None,
    variables: PromptVariables | None = None,
) -> list[ChatMessage]:
    """System prompt + history as role/content dicts, ready for ``tokenizer.apply_chat_template``.

    ``history`` holds user/assistant messages only: the system prompt always comes from the persona,
    so it is byte-identical across turns and its KV pages stay shareable in the prefix cache.
    """
    for index, message in enumerate(history):
        if message.get("role") not in ("user", "assistant") or not isinstance(message.get("content"), str):
            raise ValueError(f"history[{index}] must be a user/assistant message with text content: {message!r}")
    values = (variables or PromptVariables()).for_system_prompt()
    prompt = chat_prompt_template(persona, tone).invoke({**values, "history": [dict(m) for m in history]})
    return [_to_dict(m) for m in prompt.to_messages()]


def load_dataset(split: Split) -> list[DatasetEntry]:
    """The customer conversations of one split, with their domain/intent/tone labels."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path = PROMPTS_DIR / split / "conversations.jsonl"
    entries = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            messages = tuple({"role": m["role"], "content": m["content"]} for m in row["messages"])
            if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "user":
                raise ValueError(f"{path}:{line_number}: a conversation must start and end with the customer")
            entries.append(DatasetEntry(row["id"], row["domain"], row["intent"], row["tone"], messages))
    return entries


def load_conversations(split: Split) -> list[list[ChatMessage]]:
    """Just the message lists of one split (each ends with the customer's turn to answer)."""
    return [list(entry.messages) for entry in load_dataset(split)]


def _to_dict(message: BaseMessage) -> ChatMessage:
    assert isinstance(message.content, str), f"expected text content, got {message.content!r}"
    return {"role": _ROLES[message.type], "content": message.content}


def _keys(kind: Kind) -> list[str]:
    return sorted(path.stem for path in (PROMPTS_DIR / kind).glob("*.txt"))


@cache
def _read_template(kind: Kind, key: str) -> tuple[str, str]:
    """(title, body) of one template file; cached because files never change while running."""
    path = PROMPTS_DIR / kind / f"{key}.txt"
    if "/" in key or "\\" in key or not path.is_file():
        raise KeyError(f"no {kind[:-1]} named {key!r}; known: {', '.join(_keys(kind))}")
    return _read_file(path)


@cache
def _read_file(path: Path) -> tuple[str, str]:
    first, _, body = path.read_text(encoding="utf-8").partition("\n")
    if not first.startswith("# "):
        raise ValueError(f"{path} must start with a '# Title' line")
    return first[2:].strip(), body.strip()
