"""Enter sends and Shift+Enter adds a line, as the placeholder and the README promise, in headless Chromium.

The console and the side-by-side tab are driven only by the keyboard where an agent types: click into the
box, type, Enter. Enter while a reply streams must send nothing, queue nothing and say so, and the text
typed meanwhile must stay in the box. Fixtures and helpers as in test_browser.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from specdesk.app.chat_service import ChatService
from specdesk.app.server import RunningServer, create_app, start_in_thread
from specdesk.app.settings import Settings
from specdesk.db import MessageStatus, Role
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import make_service, tiny_console_llm, wait_engine_idle
from tests.app.test_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    open_console,
    type_and_press_enter,
    type_into,
)
from tests.app.test_browser import pytestmark as browser_marks

pytestmark = browser_marks

# Greedy replies of the tiny model repeat themselves, so the n-gram speculator gets more than one token per
# step, and a reply this long streams for seconds: time to press Enter while it is still being drafted.
REPLY_TOKENS = 2500


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatService]:
    llm: LLM = tiny_console_llm(tmp_path_factory.mktemp("keyboard"))
    yield make_service(llm, tmp_path_factory.mktemp("db") / "specdesk.db", max_tokens=REPLY_TOKENS)
    llm.shutdown()


@pytest.fixture(scope="module")
def server(service: ChatService) -> Iterator[RunningServer]:
    running = start_in_thread(create_app(service, Settings()))
    yield running
    running.stop()


@pytest.fixture
def page(server: RunningServer) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def metric(page: Any, panel: str, label: str) -> str:
    """The value shown under `label` in a metrics grid (the console's panel or one side of the comparison)."""
    return page.locator(panel).locator(".metric").filter(has_text=label).locator("b").inner_text()


def wait_for_growth(bubble: Any, num_chars: int, timeout_s: float = 30) -> None:
    """Wait until the streaming bubble holds more than `num_chars` characters (its cursor aside)."""
    deadline = time.monotonic() + timeout_s
    while len(bubble.inner_text().strip(" ▍")) <= num_chars:
        assert time.monotonic() < deadline, f"the reply did not grow past {num_chars} characters"
        time.sleep(0.05)


def test_enter_sends_shift_enter_adds_a_line_and_enter_while_drafting_sends_nothing(
    page: Any, server: RunningServer, service: ChatService
) -> None:
    from playwright.sync_api import expect

    open_console(page, server.url)
    box = page.locator("#sd-message textarea")
    type_into(page, box, "Hi, my parcel 48213 is late.")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("The tracking page has not moved in a week.")
    first = "Hi, my parcel 48213 is late.\nThe tracking page has not moved in a week."
    expect(box).to_have_value(first)  # Shift+Enter added a line and sent nothing
    assert service.repository.list_conversations("parcel 48213") == []

    page.keyboard.press("Enter")
    # Sent: the box empties, the message shows, Stop replaces Send and the reply streams.
    expect(box).to_have_value("")
    page.locator('#sd-chat [data-testid="user"]').filter(has_text="has not moved in a week").wait_for()
    page.locator("#sd-stop").wait_for(state="visible")
    expect(page.locator("#sd-status")).to_contain_text("Drafting…")
    bot = page.locator('#sd-chat [data-testid="bot"]').last
    wait_for_growth(bot, 5)  # tokens arrive…
    wait_for_growth(bot, len(bot.inner_text()))  # …and keep arriving
    expect(page.locator("#sd-enter-note")).to_have_text("")

    # Enter while the reply streams: nothing is sent or queued, the note says so, the text stays in the box.
    type_into(page, box, "Any news on it?")
    page.keyboard.press("Enter")
    expect(page.locator("#sd-enter-note")).to_contain_text("still being drafted, so Enter sent nothing")
    expect(box).to_have_value("Any news on it?")
    conversation_id = service.repository.list_conversations("parcel 48213")[0].id
    assert service.is_running(conversation_id), f"the reply ended before Enter was tested: raise {REPLY_TOKENS=}"

    page.locator("#sd-status").get_by_text("Reply ready").wait_for()
    expect(page.locator("#sd-status")).to_contain_text(f"Reply ready · {REPLY_TOKENS} tokens")
    expect(page.locator("#sd-enter-note")).to_have_text("")  # the note goes when the reply is done
    messages = service.repository.get_conversation(conversation_id).messages
    assert [(m.role, m.status) for m in messages] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]
    assert messages[0].content == first  # the line break typed with Shift+Enter is kept
    # The metrics panel shows this turn's numbers, and the n-gram speculator made steps of several tokens.
    stored = messages[1].metrics
    assert stored is not None and stored["tokens_per_step"] > 1
    assert float(metric(page, "#sd-metrics", "Tokens / step")) == pytest.approx(stored["tokens_per_step"], abs=0.01)
    assert metric(page, "#sd-metrics", "Generated tokens") == str(REPLY_TOKENS)

    # The text that waited in the box goes with the next Enter; the conversation's pages are reused.
    box.click()
    page.keyboard.press("Enter")
    page.locator('#sd-chat [data-testid="user"]').filter(has_text="Any news on it?").wait_for()
    expect(page.locator("#sd-status")).not_to_contain_text("Reply ready")  # the first turn's line is gone
    page.locator("#sd-status").get_by_text("Reply ready").wait_for()
    expect(page.locator("#sd-status")).to_contain_text("prompt tokens reused from cache")
    assert float(metric(page, "#sd-metrics", "Tokens / step")) > 1
    contents = [m.content for m in service.repository.get_conversation(conversation_id).messages if m.role is Role.USER]
    assert contents == [first, "Any news on it?"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-keyboard-console.png"), full_page=True)


def test_save_and_redraft_by_keyboard(page: Any, server: RunningServer, service: ChatService) -> None:
    from playwright.sync_api import expect

    service.settings = Settings(max_tokens=24, temperature=0.0)
    try:
        open_console(page, server.url)
        type_and_press_enter(page, "I was charged twice for order 5512")
        page.locator("#sd-status").get_by_text("Reply ready").wait_for()
        page.locator("#sd-edit").click()
        box = page.locator("#sd-message textarea")
        expect(box).to_have_value("I was charged twice for order 5512")
        expect(page.locator("#sd-send")).to_have_text("Save & redraft")
        box.click()
        page.keyboard.press("Control+End")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("Card ending 4242.")
        expect(box).to_have_value("I was charged twice for order 5512\nCard ending 4242.")
        page.keyboard.press("Enter")  # Enter saves & redrafts, as the button does
        expect(page.locator("#sd-send")).to_have_text("Send")
        page.locator("#sd-status").get_by_text("Reply ready").wait_for()
        summary = service.repository.list_conversations("order 5512")[0]
        messages = service.repository.get_conversation(summary.id).messages
        edited = "I was charged twice for order 5512\nCard ending 4242."
        assert [(m.role, m.status) for m in messages] == [
            (Role.USER, MessageStatus.COMPLETE), (Role.ASSISTANT, MessageStatus.COMPLETE),
        ]  # fmt: skip
        assert messages[0].content == edited  # replaced, with the line break typed with Shift+Enter
        page.locator('#sd-chat [data-testid="user"]').filter(has_text="Card ending 4242.").wait_for()
    finally:
        service.settings = Settings(max_tokens=REPLY_TOKENS, temperature=0.0)


def test_side_by_side_by_keyboard(page: Any, server: RunningServer, service: ChatService) -> None:
    from playwright.sync_api import expect

    page.goto(server.url)
    page.get_by_role("tab", name="Side by side").click()
    limit = page.locator("input[type=number]")  # the Max tokens slider's number box: the longest comparison
    type_into(page, limit, "512", replace=True)
    page.keyboard.press("Tab")
    box = page.locator("#sd-compare-text textarea")
    type_into(page, box, "My refund for order 9001 has not arrived.", replace=True)
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("It was approved two weeks ago.")
    message = "My refund for order 9001 has not arrived.\nIt was approved two weeks ago."
    expect(box).to_have_value(message)
    expect(page.locator("#sd-compare-verdict")).to_have_text("")  # Shift+Enter started nothing

    page.keyboard.press("Enter")
    run = page.locator("#sd-compare-run")
    expect(run).to_be_disabled()
    expect(run).to_have_text("Answering…")
    page.keyboard.press("Enter")  # while both sides stream: nothing starts, the note says so
    expect(page.locator("#sd-compare-note")).to_contain_text("still answering, so Enter started nothing")
    expect(box).to_have_value(message)

    verdict = page.locator("#sd-compare-verdict")
    verdict.get_by_text("Identical output").wait_for()
    expect(verdict).to_contain_text("512 tokens")
    expect(run).to_be_enabled()
    expect(page.locator("#sd-compare-note")).to_have_text("")
    assert float(metric(page, ".sd-side >> nth=1", "Tokens / step")) > 1  # the speculative side
    assert metric(page, ".sd-side >> nth=0", "Tokens / step") == "1.00"  # plain decoding
    left = page.locator("#sd-compare-left").inner_text()
    assert left and left == page.locator("#sd-compare-right").inner_text()
    time.sleep(1)  # a second comparison, had one been queued, would have started by now
    expect(verdict).to_contain_text("Identical output")
    wait_engine_idle(service.llm)
    page.screenshot(path=str(ARTIFACTS / "browser-keyboard-side-by-side.png"), full_page=True)
