"""`python -m mlx_longheads.generate`: mlx_lm.generate's command line, with LongHeads.

  python -m mlx_longheads.generate --max-context 128k --prompt-file book.txt \\
      --prompt "Who is the narrator?"
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cli import add_longheads_arguments, exit_on_bad_input, longheads_arguments, read_text
from .config import DEFAULT_KV_GROUP_SIZE
from .generation import LimitError, PrefillProgress, check_memory, stream_generate, truncate
from .load import load
from .models import apply_longheads
from .prompt_cache import load_prompt_cache, save_prompt_cache


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate text with LongHeads attention (mlx_lm.generate's flags)."
    )
    parser.add_argument("--model", default=None, help="MLX/HF folder, .gguf file or HF repo; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--prompt", "-p", default=None, help="the prompt, or '-' to read stdin")
    parser.add_argument("--prompt-file", default=None, help="a UTF-8 text file read before --prompt (for example a long document)")
    parser.add_argument("--max-tokens", "-m", type=int, default=256)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--kv-bits", type=int, default=None, help="store keys and values quantized to 4 or 8 bits; with LongHeads from the first token (mlx-lm's --quantized-kv-start does not apply)")
    parser.add_argument("--kv-group-size", type=int, default=None, help="elements per quantization group (default 64, or the head dim if smaller)")
    parser.add_argument("--prompt-cache-file", default=None, help="continue from this prompt cache if it exists; save the cache to it at the end")
    parser.add_argument("--verbose", action="store_true", help="print prompt and generation statistics")
    add_longheads_arguments(parser)
    parser.add_argument("--truncate", choices=["start", "middle", "end"], default=None, help="cut a prompt longer than --max-context instead of refusing it")
    return parser


def read_prompt(args) -> str:
    parts = []
    if args.prompt_file is not None:
        parts.append(read_text(args.prompt_file))
    if args.prompt == "-":
        parts.append(sys.stdin.read())
    elif args.prompt is not None:
        parts.append(args.prompt.replace("\\n", "\n").replace("\\t", "\t"))
    text = "\n\n".join(parts)
    if not text.strip():
        raise LimitError("the prompt is empty: pass --prompt, --prompt-file or --prompt -")
    return text


def encode_prompt(tokenizer: TokenizerWrapper, text: str, args) -> List[int]:
    """With the model's chat template, as mlx_lm.generate does, unless it is ignored."""
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def run(args) -> None:
    if args.seed is not None:
        mx.random.seed(args.seed)
    config = longheads_arguments(args)
    text = read_prompt(args)
    model, tokenizer = load(args.model, longheads=None)
    prompt = truncate(encode_prompt(tokenizer, text, args), args.max_context, args.truncate)
    context = min(args.max_context, len(prompt) + args.max_tokens)
    if config is not None:
        config = apply_longheads(model, config, max_size=context)
    check_memory(model, context, config)
    prompt_cache = make_prompt_cache(model)
    if args.prompt_cache_file is not None and Path(args.prompt_cache_file).exists():
        prompt_cache = load_prompt_cache(args.prompt_cache_file, model, config)
        truncate(prompt, args.max_context - prompt_cache[0].offset, None)
    sampler = make_sampler(args.temp, args.top_p)
    response = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=max(1, min(args.max_tokens, args.max_context - len(prompt))),
        sampler=sampler,
        prefill_step_size=args.prefill_step_size,
        prompt_cache=prompt_cache,
        kv_bits=None if config is not None else args.kv_bits,  # LongHeads: in its config
        kv_group_size=args.kv_group_size or DEFAULT_KV_GROUP_SIZE,
        prompt_progress_callback=PrefillProgress() if len(prompt) > args.prefill_step_size else None,
    ):
        print(response.text, end="", flush=True)
    print()
    if args.prompt_cache_file is not None:
        save_prompt_cache(args.prompt_cache_file, prompt_cache, model, config)
    if args.verbose and response is not None:
        print("=" * 10, file=sys.stderr)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec", file=sys.stderr)
        print(f"Peak memory: {response.peak_memory:.3f} GB", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_bad_input(lambda: run(args))


if __name__ == "__main__":
    main()
