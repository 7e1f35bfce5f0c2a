"""The passkey retrieval prompt of Landmark Attention and LongHeads."""

import random
from dataclasses import dataclass

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go."
    " There and back again."
)
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class Passkey:
    prompt: str
    key: int
    depth: float  # where the key line sits, 0 (start) to 1 (end)

    def is_correct(self, answer: str) -> bool:
        """Correct when the greedy answer starts with the key as a whole number."""
        answer = answer.strip()
        return answer.startswith(str(self.key)) and not answer[len(str(self.key)) :][:1].isdigit()


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: int) -> Passkey:
    """A prompt of about n_tokens tokens with the key line at the given depth."""
    line = f" The pass key is {key}. Remember it. {key} is the pass key."
    fixed = len(tokenizer.encode(TASK + line + QUESTION))
    per_filler = len(tokenizer.encode(FILLER * 20)) / 20
    n_filler = max(0, round((n_tokens - fixed) / per_filler))
    before = round(n_filler * depth)
    prompt = TASK + FILLER * before + line + FILLER * (n_filler - before) + QUESTION
    return Passkey(prompt, key, depth)


def random_passkey(tokenizer, n_tokens: int, rng: random.Random) -> Passkey:
    """Key uniform in 1..49999, depth uniform in [0, 1]."""
    return passkey_prompt(tokenizer, n_tokens, rng.random(), rng.randint(1, 49999))
