"""`python -m mlx_longheads.chat`: questions about a long document, read only once.

The LongHeads prompt cache is kept across turns: each turn feeds only its own new tokens,
so a 100k-token document costs its prefill once, not once per question.

  python -m mlx_longheads.chat --document book.txt --max-context 128k
"""

import argparse
import sys
from typing import List, Optional

from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .cli import exit_on_bad_input, read_text
from .config import LongHeadsConfig
from .generation import (
    LimitError,
    PrefillProgress,
    check_memory,
    parse_context_length,
    stream_generate,
)
from .load import load
from .models import longheads_config

SYSTEM = "You answer questions about the document below.\n\n"


def turn_tokens(tokenizer, history: List[dict], message: dict) -> List[int]:
    """The tokens one new message adds to a conversation already in the cache."""
    before = tokenizer.apply_chat_template(history, tokenize=False) if history else ""
    after = tokenizer.apply_chat_template(
        history + [message], tokenize=False, add_generation_prompt=message["role"] == "user"
    )
    if not after.startswith(before):
        raise ValueError("the chat template rewrites earlier turns; chat needs one that appends")
    return tokenizer.encode(after[len(before) :], add_special_tokens=not history)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat about a long document with LongHeads.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--document", default=None, help="a UTF-8 text file to ask about")
    parser.add_argument("--max-tokens", "-m", type=int, default=512)
    parser.add_argument("--max-context", type=parse_context_length, default=131072)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--attention-length", type=int, default=None)
    parser.add_argument("--kv-bits", type=int, default=None, help="store keys and values quantized to 4 or 8 bits, from the first token")
    return parser


def chat(args, stdin=sys.stdin) -> None:
    config = LongHeadsConfig(args.chunk_size, args.attention_length, kv_bits=args.kv_bits)
    model, tokenizer = load(args.model, longheads=config)
    check_memory(model, args.max_context, longheads_config(model))
    cache = make_prompt_cache(model)
    history: List[dict] = []
    pending: List[int] = []
    if args.document is not None:
        history.append({"role": "system", "content": SYSTEM + read_text(args.document)})
        pending = turn_tokens(tokenizer, [], history[0])
    sampler = make_sampler(args.temp)
    used = 0
    while True:
        print(">> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("q", "quit", "exit"):
            return
        message = {"role": "user", "content": line.strip()}
        prompt = pending + turn_tokens(tokenizer, history, message)
        if used + len(prompt) > args.max_context:
            raise LimitError(
                f"the conversation reached {used + len(prompt)} tokens, more than "
                f"--max-context {args.max_context}: start again with a larger one"
            )
        answer, response = "", None
        for response in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            sampler=sampler,
            prompt_cache=cache,
            prompt_progress_callback=PrefillProgress() if len(prompt) > 2048 else None,
        ):
            print(response.text, end="", flush=True)
            answer += response.text
        print()
        print(
            f"[prefill {response.prompt_tokens} tokens at {response.prompt_tps:.0f} tok/s, "
            f"{response.generation_tokens} tokens at {response.generation_tps:.1f} tok/s]",
            file=sys.stderr,
            flush=True,
        )
        # The reply's tokens are in the cache already (mlx-lm feeds each token it yields).
        history += [message, {"role": "assistant", "content": answer}]
        pending = []
        used = cache[0].offset


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_bad_input(lambda: chat(args))


if __name__ == "__main__":
    main()
