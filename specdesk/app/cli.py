"""The `specdesk` command: `serve` starts the console, `chat` talks to the same engine in a terminal.

    specdesk serve [--model M] [--speculator S] [--db URL] [--host H] [--port P] [--api-key K]
    specdesk chat  [--model M] [--speculator S] [--db URL] [--persona P] [--customer NAME]
    specdesk hash-password            (reads the password from stdin, or asks; prints an agents-file entry)

Flags win over SPECDESK_* environment variables (see app/settings.py). Nothing is loaded at import.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from specdesk.app.auth import hash_password
from specdesk.app.settings import Settings, load_agents_file
from specdesk.app.turns import TurnState

if TYPE_CHECKING:
    from specdesk.app.chat_service import TurnStream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdesk", description="SpecDesk customer-care console")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the web console (Gradio UI, /v1 API, /metrics)")
    chat = commands.add_parser("chat", help="chat in the terminal on the same engine and database")
    commands.add_parser("hash-password", help="print a scrypt entry for an agents file (password from stdin)")
    for sub in (serve, chat):
        sub.add_argument("--model", help="local checkpoint, GGUF file or hub id (default: built-in model)")
        sub.add_argument("--speculator", help="auto (default), ngram, a checkpoint folder, or none")
        sub.add_argument("--db", dest="db_url", help="SQLAlchemy URL (default: SQLite in the data dir)")
        sub.add_argument("--data-dir", type=Path, help="where the default database lives")
        sub.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs")
        sub.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights' dtype")
        sub.add_argument(
            "--quantization", choices=["auto", "int8", "q4_1", "int4", "none"],
            help="auto (default): the fastest CPU path (int8 activations; 4-bit weights where the checkpoint "
            "holds them, on AVX2), none on a GPU",
        )  # fmt: skip
        sub.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs (GPU)")
        sub.add_argument("--max-tokens", type=int, help="longest drafted reply, in tokens")
        sub.add_argument("--temperature", type=float, help="0 for greedy drafts (default 0.7)")
        sub.add_argument(
            "--repetition-penalty", type=float, help="discourages loops; 1 turns it off (default 1.1)"
        )  # fmt: skip
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 7860)")
    serve.add_argument("--api-key", dest="api_keys", action="append", help="key for /v1 (repeatable)")
    serve.add_argument("--agents-file", type=Path, help="'name:<entry>' lines; enables the login screen")
    serve.add_argument(
        "--metrics-key-required", action="store_true", default=None,
        help="/metrics needs an API key too (always so when logins are on)",
    )  # fmt: skip
    chat.add_argument("--persona", default="general", help="persona key (see prompts/personas)")
    chat.add_argument("--customer", default="", help="the customer's name, for the system prompt")
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Environment first, then the flags that were given."""
    settings = Settings.from_env(environ)
    agents = dict(settings.agents)
    agents_file = getattr(args, "agents_file", None)
    if agents_file is not None:
        agents.update(load_agents_file(agents_file))
    api_keys = getattr(args, "api_keys", None)
    return settings.with_overrides(
        model=args.model, speculator=args.speculator, db_url=args.db_url, data_dir=args.data_dir,
        device=args.device, dtype=args.dtype, quantization=args.quantization, max_tokens=args.max_tokens,
        temperature=args.temperature, repetition_penalty=args.repetition_penalty, enforce_eager=args.enforce_eager,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None), api_keys=tuple(api_keys) if api_keys else None,
        metrics_key_required=getattr(args, "metrics_key_required", None), agents=agents or None,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `specdesk` console script and of `python -m app`."""
    args = build_parser().parse_args(argv)
    if args.command == "hash-password":
        return run_hash_password()
    try:
        settings = settings_from_args(args)
        if args.command == "serve":
            settings.check_serving()  # before minutes of model loading
    except ValueError as exc:
        print(f"specdesk: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from specdesk.app.server import serve

        serve(settings)
        return 0
    return run_chat(settings, args.persona, args.customer)


def run_hash_password(stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Print `scrypt:...` for a password typed at a prompt (twice) or piped in (first line)."""
    if stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("specdesk: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = stdin.readline().rstrip("\r\n")
    try:
        print(hash_password(password), file=out)
    except ValueError as exc:
        print(f"specdesk: {exc}", file=sys.stderr)
        return 2
    return 0


_HELP = "Commands: /new  /retry  /persona KEY  /personas  /macro KEY  /macros  /quit   (Ctrl-C stops a reply)"


def run_chat(
    settings: Settings, persona: str, customer: str, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout
) -> int:
    """A terminal chat: you type as the customer, the drafted reply streams back and is stored."""
    from specdesk.app.server import build_service

    print("Loading the model…", file=out, flush=True)
    service = build_service(settings)
    try:
        conversation = service.new_conversation(persona, customer)
    except KeyError as exc:
        print(f"specdesk: {exc.args[0]}", file=out)
        return 2
    print(f"SpecDesk chat · {service.model_name} · persona {persona}. {_HELP}", file=out, flush=True)
    try:
        while True:
            print("\ncustomer> ", end="", file=out, flush=True)
            line = stdin.readline()
            if not line:
                return 0
            text = line.rstrip("\n")
            if text.startswith("/"):
                name, _, arg = text[1:].partition(" ")
                if name == "quit":
                    return 0
                if name == "new" or name == "persona":
                    persona = arg.strip() or persona
                    try:
                        conversation = service.new_conversation(persona, customer)
                    except KeyError as exc:
                        print(exc.args[0], file=out)
                        continue
                    print(f"(new conversation {conversation.id}, persona {persona})", file=out)
                elif name == "personas":
                    print("\n".join(f"  {key:<10} {title}" for title, key in service.personas()), file=out)
                elif name == "macros":
                    print("\n".join(f"  {key:<26} {title}" for title, key in service.macros()), file=out)
                elif name == "macro":
                    try:
                        reply = service.render_macro(arg.strip(), service.repository.get_conversation(conversation.id))
                    except KeyError as exc:
                        print(exc.args[0], file=out)
                        continue
                    service.add_agent_reply(conversation.id, reply)
                    print(f"agent> {reply}", file=out)
                elif name == "retry":
                    _print_turn(functools.partial(service.retry, conversation.id), out)
                else:
                    print(_HELP, file=out)
                continue
            if text.strip():
                _print_turn(functools.partial(service.send, conversation.id, text), out)
    finally:
        service.llm.shutdown()


def _print_turn(start: Callable[[], TurnStream], out: TextIO) -> None:
    try:
        updates = start()
    except ValueError as exc:
        print(f"(!) {exc}", file=out)
        return
    print("agent> ", end="", file=out, flush=True)
    final = None
    try:
        for update in updates:
            print(update.delta, end="", file=out, flush=True)
            final = update
    except KeyboardInterrupt:
        updates.close()  # aborts the engine request; the partial reply is stored as stopped
        print("\n(stopped; partial reply kept)", file=out)
        return
    if final is None:
        return
    m = final.metrics
    if final.state is TurnState.ERROR:
        print(f"\n(!) {final.error}", file=out)
    elif m:
        cached = m.get("num_cached_tokens", 0)
        print(
            f"\n({final.num_tokens} tokens · TTFT {1000 * (m.get('ttft_s') or 0):.0f} ms · "
            f"{m.get('decode_tokens_per_s', 0):.1f} tok/s · {cached} prompt tokens reused from cache)",
            file=out,
        )
    if final.num_dropped_messages:
        print(f"({final.num_dropped_messages} oldest messages left out to fit the context window)", file=out)
