"""Build a speculator folder's reply store: the base model's own replies to the training prompts.

    python -m specdesk.training.reply_store --out specdesk/engine/speculators/default

Every customer turn of the training conversations (`prompts/train`, up to --turns per conversation) is sent
as the console sends it (persona system prompt, a tone, the earlier turns) and answered by the engine's plain
decoding at the console's repetition penalty, once greedy and once at the console's temperature and top-p
(--temperatures). The replies' token ids go to `<out>/replies.npz`, which the engine's n-gram speculator loads
beside that folder's MLP speculator (`engine/speculators/reply_store.py`). The evaluation prompts
(`prompts/eval`) are never used. `--tone-shift 1 --add-to <out>/replies.npz` adds sets of replies to the same
turns in another tone (the shipped store's four sets: its folder's README.md has the commands).

The file also holds the store's accuracy table (`reply_store.accuracy_of`): the replies to the first and the
second half of the prompts are looked up in a store of the other half's, and how often each class of n-gram
gave the right next token is what the engine's walk prices its drafts by. `--recalibrate` recomputes it for
the replies a file already holds (seconds, where generating them takes ~18 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from specdesk.engine.speculators.reply_store import FILE_NAME, ReplyStore, accuracy_of


def prompts_of(tokenizer: object, turns: int, tone_shift: int = 0) -> list[list[int]]:
    """Each training conversation up to each of its first `turns` customer turns, as the console renders it;
    tone_shift: the tone of the conversation tone_shift places on instead (the same turns in another voice)."""
    from specdesk.prompts.loader import load_dataset
    from specdesk.training.train_data import chat_ids, with_system_prompt

    out = []
    for i, entry in enumerate(load_dataset("train")):
        users = [j for j, m in enumerate(entry.messages) if m["role"] == "user"]
        for u in users[:turns]:
            messages = with_system_prompt(list(entry.messages[: u + 1]), entry.domain, i + tone_shift)
            out.append(chat_ids(tokenizer, messages, add_generation_prompt=True))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the speculator folder to write replies.npz into")
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--turns", type=int, default=3, help="customer turns per conversation")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7],
                    help="one reply per prompt at each (0: greedy; the console samples at 0.7)")  # fmt: skip
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repetition-penalty", type=float, default=1.1, help="the console's default")
    ap.add_argument("--quantization", default="auto", help="EngineConfig.quantization (auto: the console's)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    ap.add_argument("--tone-shift", type=int, default=0,
                    help="each conversation in the tone of the one this many places on (another voice)")  # fmt: skip
    ap.add_argument("--add-to", type=Path, default=None,
                    help="a replies.npz made with the same --turns and --limit whose replies come first: the "
                         "store then holds both (its sets of replies and these temperatures')")  # fmt: skip
    ap.add_argument("--recalibrate", action="store_true",
                    help="only recompute the accuracy table of <out>/replies.npz (--temperatures: one value "
                         "per set of replies it holds, e.g. four where --add-to grew it from two by two)")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.recalibrate:
        replies = ReplyStore.read(out / FILE_NAME)
        _write(out, replies, len(args.temperatures))
        return
    earlier = ReplyStore.read(args.add_to) if args.add_to is not None else []  # read first: a bad path fails early

    from specdesk.engine.llm import LLM
    from specdesk.engine.sampling_params import SamplingParams

    llm = LLM(args.model, quantization=args.quantization, speculator=None, max_num_seqs=48,
              max_num_batched_tokens=1024)  # fmt: skip
    try:
        prompt_ids = prompts_of(llm.tokenizer, args.turns, args.tone_shift)[: args.limit]
        if len(earlier) % len(prompt_ids):
            raise SystemExit(f"--add-to holds {len(earlier)} replies: not whole sets over {len(prompt_ids)} prompts")
        params = [  # seeded per reply: the same replies whatever they are batched with
            SamplingParams(max_tokens=args.max_tokens, temperature=t, top_p=args.top_p if t else 1.0,
                           seed=j * len(prompt_ids) + i, repetition_penalty=args.repetition_penalty)
            for j, t in enumerate(args.temperatures)
            for i in range(len(prompt_ids))
        ]  # fmt: skip
        batch = prompt_ids * len(args.temperatures)
        replies = [out.token_ids for out in llm.generate(batch, params)]
    finally:
        llm.shutdown()
    out.mkdir(parents=True, exist_ok=True)
    _write(out, earlier + replies, len(earlier) // len(prompt_ids) + len(args.temperatures))


def _write(out: Path, replies: list[list[int]], temperatures: int) -> None:
    """replies.npz with its accuracy table. The replies lie in sets (a temperature's, or another tone's), each
    set over the same prompts in order: a fold is a half of the prompts (a conversation's turns are
    neighbours), every set's reply to a prompt in that prompt's fold."""
    prompts = len(replies) // temperatures
    if prompts * temperatures != len(replies) or prompts < 2:
        raise ValueError(f"{len(replies)} replies are not {temperatures} replies each to 2+ prompts")
    accuracy = accuracy_of(replies, [(i % prompts) * 2 // prompts for i in range(len(replies))])
    ReplyStore.save(out / FILE_NAME, replies, accuracy)
    store = ReplyStore(replies)
    print(f"{len(replies)} replies, {store.num_tokens} tokens, {len(store)} n-grams -> {out / FILE_NAME}")


if __name__ == "__main__":
    main()
