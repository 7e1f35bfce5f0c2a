"""Long-context evaluation tasks, built offline and deterministically.

Each task turns (tokenizer, n_tokens, rng) into a `Sample`: a prompt of about n_tokens
tokens, the answers that count, where they were planted and how an answer is scored.
The haystack is natural English (CPython's `pydoc_data.topics`, on every machine); the
needles follow RULER (Hsieh et al. 2024): "special magic numbers" for named keys.
`fact` and `fact_multi` ask as a reader of a real document would: no intro announces
the needle, which is a plain sentence like the text around it, and the question says it
in other words. Prompts end with a completion cue ("... The special magic number for
Lima is") because the default model is small; answers are greedy.
"""

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pydoc_data.topics import topics

from .passkey import random_passkey

CORPUS = "\n\n".join(topics[name] for name in sorted(topics))

# Needle depths of the depth x length heatmap: sample i sits at NEEDLE_DEPTHS[i % 11],
# so 11 samples fill one column and sample i is the same whatever the sample count.
# The order spreads the first few: 3 samples give 0%, 50%, 100%; 5 add 20% and 80%.
NEEDLE_DEPTHS = tuple(d / 10 for d in (0, 5, 10, 2, 8, 4, 6, 1, 9, 3, 7))

KEYS = (
    "Lima", "Oslo", "Nairobi", "Hanoi", "Quito", "Dublin", "Lisbon", "Kyoto", "Cairo",
    "Havana", "Zagreb", "Tbilisi", "Perth", "Bergen", "Porto", "Seville", "Krakow",
    "Santiago", "Manila", "Accra", "Reykjavik", "Montreal", "Vienna", "Tallinn",
)
ANIMALS = (
    "zebra", "giraffe", "otter", "walrus", "penguin", "koala", "badger", "ferret", "lynx",
    "moose", "falcon", "gecko", "heron", "ibex", "jaguar", "lemur", "marmot", "narwhal",
    "ocelot", "panda", "raccoon", "tapir", "vulture", "wombat", "beaver", "camel",
    "dolphin", "hamster", "pelican", "squirrel",
)

MAGIC_INTRO = (
    "Some special magic numbers are hidden inside the following text. "
    "Memorize them. I will quiz you about them afterwards.\n\n"
)
ANIMAL_INTRO = (
    "Some hidden animals are mentioned inside the following text. "
    "Remember every one of them. I will ask you to list them all afterwards.\n\n"
)
N_DISTRACTORS = 3  # multikey: keys planted besides the one asked
N_VALUES = 4  # multivalue: numbers planted for the one key
N_ANIMALS = 6  # aggregation: animals planted, one in each sixth of the text


@dataclass(frozen=True)
class Sample:
    prompt: str
    expected: Tuple[str, ...]  # the answers that count
    depths: Tuple[float, ...]  # where each planted sentence sits, 0 (start) to 1 (end)
    max_tokens: int  # enough for the expected answer, few enough to stay quick
    params: Dict[str, object]  # what the rng chose, for the results file
    score: Callable[[str], float] = field(compare=False, repr=False)

    def answer_chunk(self, tokenizer, chunk_size: int) -> int:
        """The chunk of the prompt holding the first expected answer's first occurrence."""
        before = self.prompt[: self.prompt.find(self.expected[0])]
        return len(tokenizer.encode(before)) // chunk_size


@lru_cache(maxsize=4)
def corpus_tokens(tokenizer) -> Tuple[int, ...]:
    """The corpus tokenized once per tokenizer (about 113k SmolLM2 tokens)."""
    return tuple(tokenizer.encode(CORPUS))


def corpus_window(tokenizer, n_tokens: int, start: int) -> List[int]:
    """n_tokens corpus tokens from start, wrapping to the beginning when it runs out."""
    ids = corpus_tokens(tokenizer)
    return [ids[(start + i) % len(ids)] for i in range(n_tokens)]


def sentence_end(text: str, i: int) -> int:
    """The first sentence or line boundary at or after character i (0 stays 0)."""
    if i <= 0:
        return 0
    ends = [j + 1 for j in (text.find(". ", i), text.find("\n", i)) if j >= 0]
    return min(ends, default=len(text))


def haystack(
    tokenizer,
    n_tokens: int,
    rng: random.Random,
    intro: str,
    planted: Sequence[Tuple[float, str]],
    question: str,
) -> str:
    """intro + corpus text with each (depth, sentence) planted + question, ~n_tokens.

    A depth is a fraction of the corpus tokens; the sentence goes at the next sentence
    boundary, so it stays readable.
    """
    fixed = len(tokenizer.encode(intro + "".join(s for _, s in planted) + question))
    filler = corpus_window(tokenizer, max(0, n_tokens - fixed), rng.randrange(10**9))
    text = tokenizer.decode(filler)
    pieces, last = [intro], 0
    for depth, sentence in sorted(planted):
        cut = sentence_end(text, len(tokenizer.decode(filler[: round(depth * len(filler))])))
        pieces += [text[last:cut], sentence]
        last = cut
    return "".join(pieces + [text[last:], question])


def contains_number(number: str, answer: str) -> bool:
    return re.search(rf"(?<!\d){number}(?!\d)", answer) is not None


def fraction_found(numbers: Sequence[str], answer: str) -> float:
    """Share of the expected numbers that appear in the answer as whole numbers."""
    return sum(contains_number(n, answer) for n in numbers) / len(numbers)


def listed_fraction(expected: Sequence[str], pool: Sequence[str], answer: str) -> float:
    """Hits / (expected + wrong guesses from the pool): listing the whole pool scores low."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    hits = len(words & set(expected))
    wrong = len(words & (set(pool) - set(expected)))
    return hits / (len(expected) + wrong)


def magic(key: str, value: int, one_of: bool = False) -> str:
    lead = "One of the special magic numbers" if one_of else "The special magic number"
    return f" {lead} for {key} is {value}."


def distinct_numbers(rng: random.Random, n: int) -> List[int]:
    return rng.sample(range(100000, 1000000), n)


def passkey_sample(tokenizer, n_tokens: int, rng: random.Random) -> Sample:
    """Landmark Attention / LongHeads passkey (mlx_longheads.passkey), depth uniform."""
    task = random_passkey(tokenizer, n_tokens, rng)
    return Sample(
        task.prompt, (str(task.key),), (task.depth,), 12, {"key": task.key},
        lambda answer: float(task.is_correct(answer)),
    )


def needle_sample(
    tokenizer, n_tokens: int, rng: random.Random, depth: Optional[float] = None
) -> Sample:
    """One magic-number sentence at a depth of natural text (default: a grid depth)."""
    if depth is None:
        depth = rng.choice(NEEDLE_DEPTHS)
    key, (value,) = rng.choice(KEYS), distinct_numbers(rng, 1)
    question = (
        f"\n\nWhat is the special magic number for {key} mentioned in the text above? "
        f"The special magic number for {key} is"
    )
    prompt = haystack(tokenizer, n_tokens, rng, MAGIC_INTRO, [(depth, magic(key, value))], question)
    expected = (str(value),)
    return Sample(
        prompt, expected, (depth,), 12, {"key": key},
        lambda answer: fraction_found(expected, answer),
    )


def multikey_sample(tokenizer, n_tokens: int, rng: random.Random) -> Sample:
    """Magic numbers for 1 + N_DISTRACTORS keys at uniform depths; one key is asked."""
    keys = rng.sample(KEYS, 1 + N_DISTRACTORS)
    values = distinct_numbers(rng, len(keys))
    depths = [rng.random() for _ in keys]
    asked = keys[0]
    question = (
        f"\n\nWhat is the special magic number for {asked} mentioned in the text above? "
        f"The special magic number for {asked} is"
    )
    planted = [(d, magic(k, v)) for d, k, v in zip(depths, keys, values)]
    prompt = haystack(tokenizer, n_tokens, rng, MAGIC_INTRO, planted, question)
    expected = (str(values[0]),)
    return Sample(
        prompt, expected, (depths[0],), 12,
        {"key": asked, "distractors": dict(zip(keys[1:], values[1:])), "distractor_depths": depths[1:]},
        lambda answer: fraction_found(expected, answer),
    )


def multivalue_sample(tokenizer, n_tokens: int, rng: random.Random) -> Sample:
    """N_VALUES magic numbers for one key at uniform depths; score = share recalled."""
    key = rng.choice(KEYS)
    values = distinct_numbers(rng, N_VALUES)
    depths = [rng.random() for _ in values]
    question = (
        f"\n\nWhat are all the special magic numbers for {key} mentioned in the text above? "
        f"The special magic numbers for {key} are"
    )
    planted = [(d, magic(key, v, one_of=True)) for d, v in zip(depths, values)]
    prompt = haystack(tokenizer, n_tokens, rng, MAGIC_INTRO, planted, question)
    expected = tuple(str(v) for v in values)
    return Sample(
        prompt, expected, tuple(depths), 40, {"key": key},
        lambda answer: fraction_found(expected, answer),
    )


def aggregation_sample(tokenizer, n_tokens: int, rng: random.Random) -> Sample:
    """N_ANIMALS animals, one in each equal slice of the text; list them all.

    The answer needs every part of the context at once: the known weak spot of top-k
    chunk selection. Score: hits / (planted + wrong animals named).
    """
    animals = rng.sample(ANIMALS, N_ANIMALS)
    depths = [(i + rng.random()) / N_ANIMALS for i in range(N_ANIMALS)]
    planted = [(d, f" One of the hidden animals is the {a}.") for d, a in zip(depths, animals)]
    question = (
        "\n\nList all the hidden animals mentioned in the text above. "
        "The hidden animals are the"
    )
    prompt = haystack(tokenizer, n_tokens, rng, ANIMAL_INTRO, planted, question)
    expected = tuple(animals)
    return Sample(
        prompt, expected, tuple(depths), 40, {},
        lambda answer: listed_fraction(expected, ANIMALS, answer),
    )


@dataclass(frozen=True)
class Fact:
    """A plain sentence with a number at its end, and a question about it in other words.

    Fields: {first} {last} (a person, asked by surname), {place}, {street}; {number} is
    the answer, drawn from NUMBERS[kind].
    """

    needle: str
    question: str  # ends with the completion cue
    kind: str


FACTS = (
    Fact(
        "The archive in {place} was moved to a new building in {number}.",
        "In what year did {place}'s archive relocate? It relocated in",
        "year",
    ),
    Fact(
        "{first} {last} published a first novel, set in {place}, in {number}.",
        "When did {last}'s debut book about {place} come out? It came out in",
        "year",
    ),
    Fact(
        "{first} {last} founded the rowing club of {place} in {number}.",
        "When did {last} start a rowing club in {place}? {last} started it in",
        "year",
    ),
    Fact(
        "Last year the number of sheep on the farm that {first} {last} owns near {place} rose to {number}.",
        "How many sheep does {last} keep outside {place}? {last} keeps",
        "count",
    ),
    Fact(
        "The concert hall in {place} has a seating capacity of {number}.",
        "How many people can sit in {place}'s concert hall? It seats",
        "count",
    ),
    Fact(
        "{first} {last} repairs clocks in a workshop on {street} Street, at house number {number}.",
        "At which address on {street} Street can you find {last}'s clock repair shop? The shop is at number",
        "house number",
    ),
    Fact(
        "The {first} {last} scholarship at the university of {place} pays each student a yearly sum in euros of {number}.",
        "How much money does {last}'s scholarship give a student in {place} every year? Each year a student receives",
        "amount",
    ),
    Fact(
        "The mountain hut above {place} was built at an altitude of {number}.",
        "How high up is the hut in the mountains over {place}? The hut is at a height of",
        "height",
    ),
)
NUMBERS = {
    "year": range(1820, 1996),
    "count": range(120, 1000),
    "house number": range(120, 1000),
    "amount": range(1200, 10000),
    "height": range(1200, 4000),
}
FIRST_NAMES = (
    "Maria", "Jonas", "Amara", "Kenji", "Lucia", "Tomas", "Ingrid", "Rafael", "Nadia",
    "Oskar", "Priya", "Mateo", "Leila", "Henrik", "Sofia", "Dmitri",
)
LAST_NAMES = (
    "Novak", "Lindqvist", "Okafor", "Tanaka", "Moreau", "Kowalski", "Haddad", "Brennan",
    "Castillo", "Virtanen", "Mendes", "Petrov", "Nakamura", "Adeyemi", "Fischer", "Rossi",
)
STREETS = (
    "Linden", "Harbour", "Mill", "Chestnut", "Orchard", "Willow", "Castle", "Quarry",
    "Ferry", "Tanner", "Rope", "Baker",
)
N_FACT_DISTRACTORS = 3  # fact_multi: facts of the asked one's template besides it
MIN_FACT_GAP = 0.05  # fact_multi: the distractors' least distance in depth from the asked one


@lru_cache(maxsize=None)
def unused_numbers(kind: str) -> Tuple[int, ...]:
    """The numbers of a kind that no digit run of the corpus contains, so the answer
    occurs once in any prompt, even one longer than the corpus."""
    runs = set(re.findall(r"\d+", CORPUS))
    used = {r[i:j] for r in runs for i in range(len(r)) for j in range(i + 1, len(r) + 1)}
    return tuple(n for n in NUMBERS[kind] if str(n) not in used)


def fact_sample(
    tokenizer, n_tokens: int, rng: random.Random, depth: Optional[float] = None,
    n_distractors: int = 0,
) -> Sample:
    """One fact at a depth (default: a grid depth), n_distractors facts of its template
    about other entities with other numbers elsewhere; the question asks the first."""
    if depth is None:
        depth = rng.choice(NEEDLE_DEPTHS)
    fact = rng.choice(FACTS)
    n = 1 + n_distractors
    numbers = rng.sample(unused_numbers(fact.kind), n)
    entities = [
        dict(first=first, last=last, place=place, street=street)
        for first, last, place, street in zip(
            rng.sample(FIRST_NAMES, n), rng.sample(LAST_NAMES, n), rng.sample(KEYS, n), rng.sample(STREETS, n)
        )
    ]
    sentences = [" " + fact.needle.format(number=v, **e) for v, e in zip(numbers, entities)]
    depths = [depth]
    while len(depths) < n:
        d = rng.random()
        if abs(d - depth) >= MIN_FACT_GAP:
            depths.append(d)
    question = "\n\n" + fact.question.format(**entities[0])
    prompt = haystack(tokenizer, n_tokens, rng, "", list(zip(depths, sentences)), question)
    expected = (str(numbers[0]),)
    params: Dict[str, object] = {"fact": sentences[0].strip()}
    if n_distractors:
        params.update(distractors=[s.strip() for s in sentences[1:]], distractor_depths=depths[1:])
    return Sample(
        prompt, expected, (depth,), 12, params,
        lambda answer: fraction_found(expected, answer),
    )


def fact_multi_sample(
    tokenizer, n_tokens: int, rng: random.Random, depth: Optional[float] = None
) -> Sample:
    """A fact and N_FACT_DISTRACTORS more of its template: the question must tell them apart."""
    return fact_sample(tokenizer, n_tokens, rng, depth, N_FACT_DISTRACTORS)


QA_TASKS = {
    "passkey": passkey_sample,
    "needle": needle_sample,
    "multikey": multikey_sample,
    "multivalue": multivalue_sample,
    "aggregation": aggregation_sample,
    "fact": fact_sample,
    "fact_multi": fact_multi_sample,
}
GRID_TASKS = ("needle", "fact", "fact_multi")  # sample i's needle at NEEDLE_DEPTHS[i % 11]


def sample_rng(task: str, n_tokens: int, index: int, seed: int) -> random.Random:
    """One generator per (task, length, index, seed): every method gets the same samples."""
    return random.Random(f"{task}:{n_tokens}:{index}:{seed}")


def make_sample(task: str, tokenizer, n_tokens: int, index: int, seed: int = 0) -> Sample:
    """Sample `index` of a question task at n_tokens; the grid tasks' needle walks
    NEEDLE_DEPTHS."""
    rng = sample_rng(task, n_tokens, index, seed)
    if task in GRID_TASKS:
        return QA_TASKS[task](tokenizer, n_tokens, rng, NEEDLE_DEPTHS[index % len(NEEDLE_DEPTHS)])
    return QA_TASKS[task](tokenizer, n_tokens, rng)


def perplexity_text(tokenizer, n_tokens: int, index: int, seed: int = 0) -> Tuple[List[int], int]:
    """n_tokens of the corpus from a random start, and the corpus length: the text
    repeats itself from that many tokens on (copying, not language modelling).

    The start does not depend on n_tokens: text `index` at 32k is the first 32k tokens
    of text `index` at 128k, so runs of different lengths share their losses."""
    rng = random.Random(f"perplexity:{index}:{seed}")
    return corpus_window(tokenizer, n_tokens, rng.randrange(10**9)), len(corpus_tokens(tokenizer))
