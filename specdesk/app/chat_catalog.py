"""What a ChatService offers around its turns: the personas, the macros and the names they fill in.

A mixin of ChatService (app/chat_service.py); the console's pickers, the CLI and the side-by-side view read it.
"""

from __future__ import annotations

from specdesk import prompts
from specdesk.app.settings import Settings
from specdesk.db import ConversationRecord


class PersonaCatalog:
    """Personas and macros, with the deployment's company and agent names (its `settings`)."""

    settings: Settings

    def personas(self) -> list[tuple[str, str]]:
        """(title, key) pairs for a picker."""
        return [(info.title, info.key) for info in prompts.list_personas()]

    def macros(self) -> list[tuple[str, str]]:
        return [(info.title, info.key) for info in prompts.list_macros()]

    def render_macro(self, key: str, conversation: ConversationRecord | None = None) -> str:
        """A canned reply with the company, agent and customer names filled in."""
        return prompts.render_macro(key, self.prompt_variables(conversation))

    def prompt_variables(self, conversation: ConversationRecord | None) -> prompts.PromptVariables:
        """Company, agent and customer names for the system prompt and macros."""
        return prompts.PromptVariables(
            company=self.settings.company,
            agent_name=self.settings.agent_name,
            customer_name=(conversation.customer_name or None) if conversation else None,
        )
