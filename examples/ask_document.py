"""Ask questions about a long local text file, reading it once.

  python examples/ask_document.py book.txt "Who is the narrator?" "Where does it end?"

The document is prefilled once into a LongHeads prompt cache; every question after the
first feeds only its own tokens.
"""

import sys

from mlx_lm.models.cache import make_prompt_cache

from mlx_longheads import load, stream_generate


def main(path: str, questions: list) -> None:
    model, tokenizer = load()  # the embedded SmolLM2-135M-Instruct, LongHeads defaults
    with open(path, encoding="utf-8") as f:
        document = f.read()
    cache = make_prompt_cache(model)
    first = [{"role": "user", "content": f"{document}\n\n{questions[0]}"}]
    prompts = [tokenizer.apply_chat_template(first, add_generation_prompt=True)]
    prompts += [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        for q in questions[1:]
    ]
    for question, prompt in zip(questions, prompts):
        print(f"Q: {question}\nA: ", end="", flush=True)
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=200, max_context=131072, prompt_cache=cache
        ):
            print(response.text, end="", flush=True)
        print(f"\n[{response.prompt_tokens} new prompt tokens]\n")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python examples/ask_document.py FILE QUESTION [QUESTION ...]")
    main(sys.argv[1], sys.argv[2:])
