"""Passkey prompts through LongHeads, with which heads found the key.

For each prompt: the greedy answer, whether it is right, the time, and for the token
that produces the answer (the prompt's last token), how many heads of each layer
selected a chunk holding the key. Writes a markdown report.

  python scripts/passkey_diagnosis.py --length 16384 --attention-length 4096 --samples 3
"""

import argparse
import json
import random
import time
from pathlib import Path

import mlx_longheads  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from mlx_longheads import longheads
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.load import load
from mlx_longheads.passkey import random_passkey


class SelectionRecorder:
    """Wraps longheads.select_chunks to keep each layer's last selection of a call."""

    def __init__(self):
        self.calls = []
        self.original = longheads.select_chunks

    def __call__(self, *args, **kwargs):
        slots = self.original(*args, **kwargs)
        self.calls.append(slots[..., -1, :])  # the last group of this call: [B, Hs, k]
        return slots

    def last_token_selections(self, n_layers: int) -> np.ndarray:
        """[layers, Hs, k] from the most recent forward pass."""
        return np.stack([np.array(s[0]) for s in self.calls[-n_layers:]])


def key_token_span(tokenizer, prompt: str, key: int) -> range:
    """Token positions of the key's first occurrence."""
    line = f"The pass key is {key}."
    i = prompt.index(line)
    return range(len(tokenizer.encode(prompt[:i])), len(tokenizer.encode(prompt[: i + len(line)])))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--attention-length", type=int, default=4096)
    parser.add_argument("--selection", default="query_head")
    parser.add_argument("--prefill", default="grouped")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    # The paper's threshold (F = L): the heads select from L on, inside the trained length too.
    config = LongHeadsConfig(
        args.chunk_size, args.attention_length, args.selection, args.prefill,
        full_attention_length=args.attention_length,
    )
    model, tokenizer = load(args.model, longheads=config)
    n_layers = len(model.layers)
    recorder = SelectionRecorder()
    longheads.select_chunks = recorder
    rng = random.Random(args.seed)
    rows = []
    for sample in range(args.samples):
        task = random_passkey(tokenizer, args.length, rng)
        tokens = tokenizer.encode(task.prompt)
        span = key_token_span(tokenizer, task.prompt, task.key)
        key_chunks = set(range(span.start // args.chunk_size, (span.stop - 1) // args.chunk_size + 1))
        recorder.calls.clear()
        tic = time.perf_counter()
        answer_tokens, per_layer = [], None
        for n, (token, _) in enumerate(generate_step(mx.array(tokens), model, max_tokens=8)):
            if n == 0:
                prefill_s = time.perf_counter() - tic
                if len(tokens) > args.attention_length:
                    chosen = recorder.last_token_selections(n_layers)
                    per_layer = [
                        int(sum(bool(key_chunks & set(head.tolist())) for head in layer))
                        for layer in chosen
                    ]
            answer_tokens.append(token)
        answer = tokenizer.decode(answer_tokens)
        row = dict(
            sample=sample,
            tokens=len(tokens),
            key=task.key,
            depth=round(task.depth, 3),
            key_chunks=sorted(key_chunks),
            answer=answer,
            correct=task.is_correct(answer),
            prefill_s=round(prefill_s, 1),
            total_s=round(time.perf_counter() - tic, 1),
            heads_with_key_chunk=per_layer,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)

    heads = model.args.num_attention_heads if args.selection == "query_head" else model.args.num_key_value_heads
    lines = [
        f"# Passkey diagnosis: {args.length} tokens, chunk {args.chunk_size}, "
        f"attention_length {args.attention_length}, {args.selection}, {args.prefill} prefill",
        "",
        f"Command: `python scripts/passkey_diagnosis.py --length {args.length} --samples {args.samples} "
        f"--seed {args.seed} --chunk-size {args.chunk_size} --attention-length {args.attention_length} "
        f"--selection {args.selection} --prefill {args.prefill}`",
        "",
        f"Correct: {sum(r['correct'] for r in rows)} / {len(rows)}",
        "",
        "| sample | tokens | depth | key | answer | correct | prefill s | total s | "
        f"heads (of {heads}) per layer that selected the key's chunk, answer token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sample']} | {r['tokens']} | {r['depth']} | {r['key']} | {r['answer']!r} | "
            f"{r['correct']} | {r['prefill_s']} | {r['total_s']} | {r['heads_with_key_chunk']} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
