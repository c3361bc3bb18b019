"""Engine-test hooks: which LangChain standard-suite tests run on which engine (test_langchain_standard.py);
the suite forbids overriding its tests, so they are sorted here, at collection."""

from __future__ import annotations

import pytest

# Integration tests whose assertions need a model that reads the prompt (tool arguments, JSON content).
NEEDS_A_REAL_MODEL = (
    "test_tool_calling", "test_tool_calling_async", "test_bind_runnables_as_tools", "test_tool_choice",
    "test_tool_calling_with_no_arguments", "test_structured_output", "test_structured_output_async",
    "test_structured_output_pydantic_2_v1", "test_structured_output_optional_param", "test_json_mode",
    "test_agent_loop", "test_unicode_tool_call_integration",
)  # fmt: skip
_RANDOM_WEIGHTS = (
    "random weights cannot follow the prompt (the grammar makes any call or JSON valid, not the one asked "
    "for); TestChatSpecDeskDefaultModelIntegration runs this test on the default model"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    kept = []
    for item in items:
        name = getattr(item, "originalname", item.name)
        cls = getattr(item, "cls", None)
        if cls is not None and cls.__name__ == "TestChatSpecDeskIntegration" and name in NEEDS_A_REAL_MODEL:
            item.add_marker(pytest.mark.skip(reason=_RANDOM_WEIGHTS))
        if cls is not None and cls.__name__ == "TestChatSpecDeskDefaultModelIntegration" and (
            name not in NEEDS_A_REAL_MODEL
        ):  # fmt: skip
            continue  # plumbing: the tiny engine covers it
        kept.append(item)
    items[:] = kept
