"""The plain-fact retrieval tasks: a fact stated the way the text around it states
things, asked about in other words, with no intro announcing it."""

import re
from typing import Optional

import pytest

from mlx_longheads.load import load
from mlx_longheads.tasks import CORPUS, FACTS, Fact, MIN_FACT_GAP, NEEDLE_DEPTHS, NUMBERS, make_sample

TASKS = ("fact", "fact_multi")
ENTITIES = dict(first="Maria", last="Novak", place="Tallinn", street="Linden")


@pytest.fixture(scope="module")
def tokenizer():
    return load(longheads=None)[1]


def words(text: str) -> list:
    return re.findall(r"[a-z0-9']+", text.lower())


def runs(text: str, n: int = 6) -> set:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def number_of(fact: Fact, sentence: str) -> Optional[str]:
    """The number of a sentence written from the fact's template (None: another one)."""
    pattern = re.escape(fact.needle)
    for name in ("first", "last", "place", "street"):
        pattern = pattern.replace(re.escape("{" + name + "}"), r"\w+")
    match = re.fullmatch(pattern.replace(re.escape("{number}"), r"(\d+)"), sentence)
    return match and match[1]


def question_of(prompt: str) -> str:
    """The question ends the prompt after a blank line."""
    return prompt[prompt.rindex("\n\n") + 2 :]


def test_the_templates_are_several_and_end_with_their_number():
    assert len(FACTS) >= 5
    assert {"year", "count", "amount"} <= {fact.kind for fact in FACTS} <= set(NUMBERS)
    for fact in FACTS:
        assert fact.needle.endswith(" {number}.") and "{number}" not in fact.question
        assert not fact.question.endswith(("?", ".")), "a completion cue ends the question"


@pytest.mark.parametrize("fact", FACTS, ids=[f"{i}-{fact.kind}" for i, fact in enumerate(FACTS)])
def test_every_question_says_its_fact_in_other_words(fact):
    needle = fact.needle.format(number=1987, **ENTITIES)
    question = fact.question.format(**ENTITIES)
    assert needle[:-1] not in question
    assert not runs(needle) & runs(question)


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_for_a_seed_and_differ_across_indices(tokenizer, task):
    sample = make_sample(task, tokenizer, 1024, 2)
    assert sample == make_sample(task, tokenizer, 1024, 2)
    assert sample.prompt != make_sample(task, tokenizer, 1024, 3).prompt
    assert sample.prompt != make_sample(task, tokenizer, 1024, 2, seed=1).prompt


@pytest.mark.parametrize("task", TASKS)
def test_the_answer_occurs_once_and_the_question_does_not_repeat_the_needle(tokenizer, task):
    for index in range(11):
        sample = make_sample(task, tokenizer, 1024, index)
        (answer,) = sample.expected
        assert sample.prompt.count(answer) == 1, (index, answer)
        needle, question = sample.params["fact"], question_of(sample.prompt)
        assert needle in sample.prompt and needle[:-1] not in question
        assert not runs(needle) & runs(question), index
        assert answer not in question


def test_the_answer_occurs_once_in_a_prompt_longer_than_the_corpus(tokenizer):
    sample = make_sample("fact_multi", tokenizer, 128 * 1024, 0)
    numbers = [sample.expected[0]] + [d.rsplit(" ", 1)[1][:-1] for d in sample.params["distractors"]]
    assert len(tokenizer.encode(sample.prompt)) > len(tokenizer.encode(CORPUS))
    assert [sample.prompt.count(n) for n in numbers] == [1, 1, 1, 1]


@pytest.mark.parametrize("task", TASKS)
def test_no_intro_announces_the_fact(tokenizer, task):
    """The prompt opens with the corpus text (or, at depth 0, with the fact itself)."""
    start = make_sample(task, tokenizer, 1024, 1).prompt  # depth 0.5
    assert start[:200] in CORPUS
    at_zero = make_sample(task, tokenizer, 1024, 0)
    assert at_zero.prompt.startswith(" " + at_zero.params["fact"])


def test_fact_multi_plants_four_facts_of_one_template_with_distinct_numbers(tokenizer):
    for index in range(4):
        sample = make_sample("fact_multi", tokenizer, 2048, index)
        facts = [sample.params["fact"], *sample.params["distractors"]]
        (template,) = [fact for fact in FACTS if all(number_of(fact, f) for f in facts)]
        numbers = [number_of(template, f) for f in facts]
        assert len(facts) == 4 and len(set(numbers)) == 4 and numbers[0] == sample.expected[0]
        for fact, number in zip(facts, numbers):
            assert sample.prompt.count(fact) == 1 and sample.prompt.count(number) == 1
        # The names the question uses are the asked fact's alone.
        question = question_of(sample.prompt)
        names = set(re.findall(r"[A-Z]\w+", question)) & set(re.findall(r"\w+", facts[0]))
        names -= set(re.findall(r"\w+", template.needle))
        assert names and not any(name in f for name in names for f in facts[1:]), names


@pytest.mark.parametrize("task", TASKS)
def test_the_prompt_has_the_length_and_the_fact_its_samples_depth(tokenizer, task):
    n = 4096
    for index in range(5):
        sample = make_sample(task, tokenizer, n, index)
        tokens = len(tokenizer.encode(sample.prompt))
        assert abs(tokens - n) <= 0.01 * n
        assert sample.depths == (NEEDLE_DEPTHS[index],)
        planted = [(sample.params["fact"], sample.depths[0])]
        planted += zip(sample.params.get("distractors", []), sample.params.get("distractor_depths", []))
        for fact, depth in planted:
            position = len(tokenizer.encode(sample.prompt[: sample.prompt.index(fact)])) / tokens
            assert abs(position - depth) < 0.03, (fact, position, depth)
        for depth in sample.params.get("distractor_depths", []):
            assert abs(depth - sample.depths[0]) >= MIN_FACT_GAP


def test_the_score_is_the_asked_number_only(tokenizer):
    sample = make_sample("fact_multi", tokenizer, 1024, 4)
    right = sample.expected[0]
    assert sample.score(f" {right}.") == 1.0
    assert sample.score(f" {right} metres above the sea.") == 1.0
    for distractor in sample.params["distractors"]:
        assert sample.score(" " + distractor.rsplit(" ", 1)[1]) == 0.0  # " 413."
    assert sample.score(" 100.") == 0.0
    assert sample.score(f" {right}7.") == 0.0
