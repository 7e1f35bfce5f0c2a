"""What the command-line tools of this project share: bad input, files, LongHeads' flags."""

import argparse
import sys
from typing import Callable, Optional

from .config import SELECTIONS, LongHeadsConfig
from .generation import DEFAULT_MAX_CONTEXT, parse_context_length


def exit_on_bad_input(command: Callable[[], None]) -> None:
    """Run a command-line tool: bad input ends in one line on stderr and exit status 1."""
    try:
        command()
    except (ValueError, FileNotFoundError) as e:  # LimitError, ConfigError, ModelError, ...
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


def read_text(path: str) -> str:
    """A UTF-8 text file the user named, or a ValueError that says what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: convert it (iconv -t UTF-8)")


SELECTION_HELP = {
    "two_pass_carry": "a decoded token in two passes too (every layer measured), at 2-7x the default's decode time",
    "one_pass_filter": "one pass, one calibrated layer chooses: the paper's reads per token",
    "two_pass_prompt": "the prompt read as two_pass_carry (twice), tokens decoded as one_pass_filter",
    "one_pass_prompt": "the prompt read in one pass (the most peaked layer so far chooses), tokens as one_pass_filter",
    "one_pass_reread": "the default: as one_pass_prompt, and at the prompt's last token its question (the last two chunks) read again following that token's choice, where it chose anew",
    "query_head": "the paper's rule, per query head",
    "kv_head": "the paper's rule, per KV head (GQA)",
}


class LineBreakHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of a flag's help, so a list of choices reads one a line."""

    def _split_lines(self, text: str, width: int) -> list:
        lines = []
        for part in text.splitlines():
            lines += super()._split_lines(part, width)
        return lines


def add_longheads_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the context length and the LongHeads parameters (--kv-bits and
    --kv-group-size are the host tool's: mlx-lm's tools have them too)."""
    parser.formatter_class = LineBreakHelpFormatter
    parser.add_argument("--max-context", type=parse_context_length, default=DEFAULT_MAX_CONTEXT, help="the longest prompt accepted: 32k, 128k, 131072, 1m (default 128k)")
    parser.add_argument("--attention", choices=["longheads", "full"], default="longheads", help="'full' runs mlx-lm's stock attention for comparison")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--attention-length", type=int, default=None)
    parser.add_argument(
        "--selection",
        choices=list(SELECTIONS),
        default=LongHeadsConfig.selection,
        help="how heads pick chunks past --full-attention-length:\n"
        + "\n".join(f"{name}: {SELECTION_HELP[name]}" for name in SELECTIONS),
    )
    parser.add_argument("--prefill", choices=["grouped", "exact"], default="grouped")
    parser.add_argument("--full-attention-length", type=int, default=None, help="prompts up to this many tokens get stock attention (default: the trained length; the paper's rule: --attention-length)")
    parser.add_argument("--filter-layer", type=int, default=None, help="the layer whose choice one_pass_filter (and the *_prompt selections at a decoded token) shares (default: calibrated on the model, once)")


def longheads_arguments(args: argparse.Namespace) -> Optional[LongHeadsConfig]:
    """The configuration those flags ask for; None for --attention full."""
    if args.attention != "longheads":
        return None
    return LongHeadsConfig(
        args.chunk_size, args.attention_length, args.selection, args.prefill,
        args.kv_bits, args.kv_group_size, args.full_attention_length, args.filter_layer,
    )
