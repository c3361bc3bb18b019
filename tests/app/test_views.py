"""What records look like on screen: escaping, status suffixes, feedback, metrics and plot frames."""

from __future__ import annotations

from datetime import datetime, timezone

from specdesk.app import views
from specdesk.app.turns import TurnState, TurnUpdate
from specdesk.db import ConversationRecord, ConversationStatus, FeedbackRecord, MessageRecord, MessageStatus, Role

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def message(
    i: int, role: Role, content: str, status: MessageStatus = MessageStatus.COMPLETE, **kw: object
) -> MessageRecord:
    return MessageRecord(i, 1, i, role, content, status, kw.pop("error", None), kw.pop("metrics", None), NOW, **kw)  # type: ignore[arg-type]


def conversation(*messages: MessageRecord) -> ConversationRecord:
    return ConversationRecord(1, "Late <b>parcel</b>", "Dana", "retail", ConversationStatus.OPEN, NOW, NOW, messages)


def test_chat_messages_escape_customer_and_clean_model_text() -> None:
    liked = FeedbackRecord(2, 1, "", NOW, NOW)
    conv = conversation(
        message(1, Role.USER, "![x](https://evil.example/?q=1) <script>"),
        message(2, Role.ASSISTANT, "**Sure** ![y](https://evil.example/p.png)", feedback=liked),
        message(3, Role.USER, "and?"),
        message(4, Role.ASSISTANT, "partial", MessageStatus.STOPPED),
        message(5, Role.USER, "hello"),
        message(6, Role.ASSISTANT, "", MessageStatus.ERROR, error="prompt too long"),
        message(7, Role.ASSISTANT, "", MessageStatus.PENDING),
    )
    shown, ids = views.chat_messages(conv)
    assert ids == [1, 2, 3, 4, 5, 6]  # the pending reply is drawn live by the stream, not from the DB
    text = "\n".join(m["content"] for m in shown)
    # The customer's URL is shown as text, not even a link (its "://" is an entity).
    assert "evil.example" not in text.replace("https&#58;//evil.example/?q=1", "")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert shown[1]["content"].startswith("**Sure** *[image removed: y]*")
    assert "stopped; partial reply kept" in shown[3]["content"]
    assert "prompt too long" in shown[5]["content"]
    assert views.feedback_values(conv) == [views.LIKE, None, None]


def test_status_line_says_what_happened() -> None:
    done = TurnUpdate(1, 2, TurnState.COMPLETE, "hi", "", 12, 1.5, 4, {"num_cached_tokens": 1700})
    line = views.status_line(done)
    assert "Reply ready" in line and "1700 prompt tokens reused from cache" in line
    assert "4 oldest message(s) left out" in line
    stopped = TurnUpdate(1, 2, TurnState.STOPPED, "hi", "", 3, 0.2)
    assert "Stopped" in views.status_line(stopped)
    failed = TurnUpdate(1, 2, TurnState.ERROR, error="the message is too long <for> the context")
    assert "&lt;for&gt;" in views.status_line(failed)


def test_metrics_card_and_turns_frame() -> None:
    metrics = {"ttft_s": 0.25, "decode_tokens_per_s": 41.7, "tokens_per_step": 2.5, "num_prompt_tokens": 900}
    metrics |= {"num_cached_tokens": 800, "num_generated_tokens": 64, "total_s": 1.9}
    card = views.metrics_card(metrics)
    assert "250 ms" in card and "41.7" in card and "2.50" in card and "800 of 900" in card and "1.90 s" in card
    assert views.metrics_card(None).count("—") == 6
    conv = conversation(message(1, Role.USER, "a"), message(2, Role.ASSISTANT, "b", metrics=metrics))
    frame = views.turns_frame(conv)
    assert frame.to_dict("records") == [{"turn": "01", "tokens/s": 41.7, "TTFT (ms)": 250, "cached prompt tokens": 800}]
    assert list(views.turns_frame(None).columns) == list(frame.columns)


def test_sidebar_and_titles() -> None:
    assert (
        views.title_from("  Where   is my parcel? It was due on Monday and nothing came  ", 24)
        == "Where is my parcel? It…"
    )
    assert views.title_from("Short") == "Short"
    assert "&lt;b&gt;" in views.header(conversation(), {"retail": "Retail"})
