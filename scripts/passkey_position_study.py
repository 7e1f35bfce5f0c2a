"""Does the model itself lose a pass key that sits near token 7000?

The default missed three pass keys on the GPU (16k samples 8 and 11, 32k sample 19), each with
the key's chunk in every head's window at the answer, and all three keys sit at tokens 6,700 to
7,400: inside the trained length, where the prompt is read by the model's own attention. Stock
attention missed its one 8k sample whose key sits there too (sample 19). This study asks stock
attention, inside its trained length, for the eval's 16k pass keys placed at chosen token
positions of an 8k prompt; the text before a key is read once per position and copied.

  python scripts/passkey_position_study.py --positions 6900,7200,7900 --keys 10 \
      --output results/passkey_position_study.md
"""

import argparse
import copy
from pathlib import Path

import mlx_longheads  # noqa: F401  (OpenBLAS before mlx)
from mlx_longheads.eval import answer_question, code_version, prefilled
from mlx_longheads.load import load
from mlx_longheads.passkey import TASK, passkey_prompt
from mlx_longheads.tasks import make_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens (inside the trained length)")
    parser.add_argument("--positions", default="6900,7200,7900", help="the key line's token positions")
    parser.add_argument("--keys", type=int, default=10, help="the keys of the eval's first 16k passkey samples")
    parser.add_argument("--key", type=int, action="append", default=[], help="a key asked beside them")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    model, tokenizer = load(longheads=None)
    keys = [make_sample("passkey", tokenizer, 16384, i).params["key"] for i in range(args.keys)] + args.key
    task_tokens = len(tokenizer.encode(TASK))
    commit = code_version()
    rows, right = [], {}
    for position in [int(p) for p in args.positions.split(",")]:
        depth = (position - task_tokens) / (args.length - task_tokens)
        prefixes = {}
        for key in keys:
            task = passkey_prompt(tokenizer, args.length, depth, key)
            text = task.prompt[: task.prompt.index(" The pass key is")]
            if text not in prefixes:
                prefix = tokenizer.encode(text)
                prefixes[text] = (prefix, prefilled(model, prefix))  # read once
            prefix, cache = prefixes[text]
            tokens = tokenizer.encode(task.prompt)
            assert tokens[: len(prefix)] == prefix, "the prompt's tokens must start with its prefix's"
            answer, _ = answer_question(model, tokenizer, tokens[len(prefix) :], 12, copy.deepcopy(cache), None)
            correct = task.is_correct(answer)
            right.setdefault(position, []).append(correct)
            rows.append(f"| {len(prefix)} | {len(tokens)} | {key} | {answer.strip()[:30]!r} | {'right' if correct else 'wrong'} |")
            print(rows[-1], flush=True)

    lines = [
        "# Stock attention on pass keys placed near token 7000, inside the trained length",
        "",
        f"Commit {commit}; SmolLM2-135M-Instruct, float32, greedy, the CPU; stock attention (`load(longheads=None)`),"
        f" {args.length}-token passkey prompts; keys {', '.join(map(str, keys))} (the first {args.keys}: the eval's"
        f" first 16k passkey samples').",
        "",
        f"`python scripts/passkey_position_study.py --length {args.length} --positions {args.positions}"
        f" --keys {args.keys}{''.join(f' --key {k}' for k in args.key)} --output {args.output}`",
        "",
        "| key line at token | prompt tokens | key | answer | |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Right, by the key line's position: "
        + ", ".join(f"{p}: {sum(r)} / {len(r)}" for p, r in right.items()) + ".",
        "",
    ]
    args.output.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
