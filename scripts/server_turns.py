"""Two turns over one long document through `python -m mlx_longheads.server`.

Starts the server on the embedded model (LongHeads' default configuration unless more
server flags are given), streams a ~16k-token document and a question with the `openai`
client, then turn 2 as every client sends it (the document, turn 1 and its answer, a
new question), and records each turn's time to first token and prompt tokens processed
(`usage`: prompt tokens less those found in the prompt cache). Writes OUTPUT.md,
OUTPUT.json and the server's log OUTPUT.log.

  python scripts/server_turns.py --output results/server_turns
  python scripts/server_turns.py --output /tmp/stock -- --attention full
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx_longheads  # noqa: F401  (OpenBLAS before mlx)
import openai
from mlx_lm.utils import load_tokenizer

from mlx_longheads.resolve import resolve_model
from mlx_longheads.tasks import corpus_window

QUESTIONS = ("What is this document about?", "Which Python statements does it describe?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, flags, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlx_longheads.server", "--port", str(port), *flags]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    while True:
        if process.poll() is not None:
            sys.exit(f"the server stopped: {log.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return process
        except OSError:
            time.sleep(1)


def turn(client: openai.OpenAI, messages, max_tokens: int) -> dict:
    """One streamed request: time to the first token, the whole time, usage, answer."""
    start = time.perf_counter()
    first, text, usage = None, "", None
    stream = client.chat.completions.create(
        model="default_model", messages=messages, max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    cached = usage.prompt_tokens_details.cached_tokens
    return {
        "time_to_first_token_s": round(first - start, 2),
        "total_s": round(time.perf_counter() - start, 2),
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": cached,
        "processed_tokens": usage.prompt_tokens - cached,
        "completion_tokens": usage.completion_tokens,
        "answer": text,
    }


def report(result: dict) -> str:
    one, two = result["turns"]
    rows = "\n".join(
        f"| {i} | {t['prompt_tokens']} | {t['cached_tokens']} | {t['processed_tokens']} | "
        f"{t['time_to_first_token_s']:.1f} | {t['total_s']:.1f} | {t['completion_tokens']} |"
        for i, t in enumerate(result["turns"], 1)
    )
    return f"""# Two turns over a {result['document_tokens']}-token document through the server

`{result['command']}`

Server flags: `{' '.join(result['server_flags']) or '(none: the defaults)'}`. Streamed with the
`openai` client, greedy, at most {result['max_tokens']} tokens per answer; processed = prompt
tokens less those the prompt cache held (`usage.prompt_tokens_details.cached_tokens`).

| turn | prompt tokens | from the cache | processed | time to first token (s) | total (s) | tokens generated |
|---|---|---|---|---|---|---|
{rows}

Turn 2's time to first token is {two['time_to_first_token_s'] / one['time_to_first_token_s']:.4f} of turn 1's
(1/{one['time_to_first_token_s'] / two['time_to_first_token_s']:.0f}).

Answers: turn 1 {json.dumps(one['answer'])}; turn 2 {json.dumps(two['answer'])}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="the first prompt's length, about")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--output", default="results/server_turns", help="writes OUTPUT.md, .json and .log")
    parser.add_argument("server_flags", nargs="*", help="after --: more flags for the server")
    args = parser.parse_args()
    flags = ["--max-context", "32k", *args.server_flags]
    tokenizer = load_tokenizer(resolve_model(None))
    document = tokenizer.decode(corpus_window(tokenizer, args.tokens - 60, 0))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(port, flags, output.with_suffix(".log"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=7200)
        messages = [{"role": "user", "content": f"{document}\n\n{QUESTIONS[0]}"}]
        first = turn(client, messages, args.max_tokens)
        messages += [
            {"role": "assistant", "content": first["answer"]},
            {"role": "user", "content": QUESTIONS[1]},
        ]
        second = turn(client, messages, args.max_tokens)
    finally:
        server.terminate()
        server.wait()
    result = {
        "command": " ".join(["python", "scripts/server_turns.py", *sys.argv[1:]]),
        "server_flags": flags,
        "document_tokens": len(tokenizer.encode(document)),
        "max_tokens": args.max_tokens,
        "turns": [first, second],
        "ratio": round(second["time_to_first_token_s"] / first["time_to_first_token_s"], 5),
    }
    output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    output.with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
