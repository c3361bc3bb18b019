"""Several threads writing at once (a Gradio server with concurrency) never see 'database is locked'."""

from __future__ import annotations

import threading

from specdesk.db import ChatRepository, MessageStatus, Role

NUM_THREADS = 8
NUM_TURNS = 10


def test_concurrent_writers_share_a_conversation_without_lock_errors(repo: ChatRepository) -> None:
    shared = repo.create_conversation("Shared")
    errors: list[BaseException] = []
    start = threading.Barrier(NUM_THREADS)

    def worker(index: int) -> None:
        try:
            start.wait()
            own = repo.create_conversation(f"Worker {index}")
            for turn in range(NUM_TURNS):
                repo.add_message(shared.id, Role.USER, f"worker {index} turn {turn}")
                reply = repo.start_assistant_message(own.id)
                repo.list_conversations("worker")  # readers interleave with the writers
                done = repo.finish_assistant_message(
                    reply.id, f"reply {turn}", MessageStatus.COMPLETE, metrics={"ttft_s": 0.01}
                )
                repo.set_feedback(done.id, 1 if turn % 2 else -1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(NUM_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    messages = repo.get_conversation(shared.id).messages
    # Positions are assigned inside the write transaction, so no two writers got the same one.
    assert [m.position for m in messages] == list(range(NUM_THREADS * NUM_TURNS))
    assert len(repo.list_conversations()) == NUM_THREADS + 1
