"""The evaluation tool: tasks, scoring, methods, resuming, report and bad input."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from conftest import clone, tiny_model, with_longheads
from mlx_longheads import eval as evaluation
from mlx_longheads import longheads
from mlx_longheads.config import SELECTIONS, LongHeadsConfig
from mlx_longheads.eval_report import NO_COMMIT, NO_COMMIT_NOTE, SELECTION_NOTES, results_path, write_report
from mlx_longheads.models import apply_longheads
from mlx_longheads.tasks import ANIMALS, QA_TASKS, make_sample, perplexity_text

DEFAULT = LongHeadsConfig.selection  # what a method name that leaves the selection out runs


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return embedded[1]


@pytest.mark.parametrize("task", list(QA_TASKS))
def test_prompts_have_the_length_and_their_needles_at_the_stated_depths(tokenizer, task):
    n = 4096
    sample = make_sample(task, tokenizer, n, index=3)
    tokens = len(tokenizer.encode(sample.prompt))
    assert abs(tokens - n) <= 0.01 * n
    # Multikey states the asked needle's depth; the others state all of theirs.
    for expected, depth in zip(sample.expected, sample.depths):
        at = sample.prompt.index(f" {expected}.")
        position = len(tokenizer.encode(sample.prompt[:at])) / tokens
        assert abs(position - depth) < 0.03, (expected, position, depth)


def test_needle_depths_walk_the_grid(tokenizer):
    depths = [make_sample("needle", tokenizer, 1024, index=i).depths[0] for i in range(12)]
    assert sorted(depths[:11]) == [i / 10 for i in range(11)] and depths[11] == depths[0]
    assert depths[:3] == [0.0, 0.5, 1.0]


def test_multikey_plants_distractors(tokenizer):
    sample = make_sample("multikey", tokenizer, 2048, index=0)
    for key, value in sample.params["distractors"].items():
        assert f"The special magic number for {key} is {value}." in sample.prompt
    assert sample.score(f" {next(iter(sample.params['distractors'].values()))}.") == 0.0


def test_scoring_accepts_the_answer_and_rejects_others(tokenizer):
    for task in ("passkey", "needle", "multikey"):
        sample = make_sample(task, tokenizer, 1024, index=0)
        right = sample.expected[0]
        assert sample.score(f" {right}. Remember it.") == 1.0
        assert sample.score(" 12.") == 0.0
        assert sample.score(f" {right}7.") == 0.0  # a longer number is not the number
    multivalue = make_sample("multivalue", tokenizer, 1024, index=0)
    values = multivalue.expected
    assert multivalue.score(f" {values[0]}, {values[2]} and 5.") == 0.5
    aggregation = make_sample("aggregation", tokenizer, 1024, index=0)
    assert aggregation.score(" " + ", ".join(aggregation.expected)) == 1.0
    assert aggregation.score(" " + ", ".join(aggregation.expected[:3])) == 0.5
    assert aggregation.score(" " + ", ".join(ANIMALS)) == pytest.approx(6 / 30)


def test_samples_are_deterministic(tokenizer):
    for task in QA_TASKS:
        assert make_sample(task, tokenizer, 1024, 2) == make_sample(task, tokenizer, 1024, 2)
        assert make_sample(task, tokenizer, 1024, 2) != make_sample(task, tokenizer, 1024, 3)
        assert make_sample(task, tokenizer, 1024, 2) != make_sample(task, tokenizer, 1024, 2, seed=1)
    short, repeats_at = perplexity_text(tokenizer, 1000, 0)
    long, _ = perplexity_text(tokenizer, 3000, 0)
    assert long[:1000] == short and repeats_at > 100_000


def test_method_names_are_canonical():
    flags, trained = LongHeadsConfig(), 8192
    names = [m.name for m in evaluation.parse_methods("longheads:L=2048,w=128,full,window", flags, trained)]
    assert names == [f"longheads:L=2048,w=128,sel={DEFAULT},prefill=grouped,F=8192", "full", "window:L=2048"]
    same = evaluation.parse_methods("longheads,longheads:L=2048,w=256,F=8192", flags, trained)
    assert len(same) == 1
    # F = L, the paper's threshold, keeps the name the results had before F existed.
    paper = evaluation.parse_methods("longheads:F=2048,sel=query_head", flags, trained)
    assert [m.name for m in paper] == ["longheads:L=2048,w=256,sel=query_head,prefill=grouped"]
    ablation = [m.name for m in evaluation.parse_methods("ablation", flags, trained)]
    for length in (2048, 4096, 6144):  # a quarter, half and three quarters of the trained length
        assert f"longheads:L={length},w=256,sel={DEFAULT},prefill=grouped,F=8192" in ablation
    assert "longheads:L=2048,w=256,sel=query_head,prefill=grouped,F=8192,forced=prev" in ablation
    designs = [m.name for m in evaluation.parse_methods("designs", flags, trained)]
    assert designs == [
        "full",
        "longheads:L=2048,w=256,sel=query_head,prefill=grouped",
        "longheads:L=2048,w=256,sel=query_head,prefill=grouped,F=8192",
        "longheads:L=2048,w=256,sel=two_pass_carry,prefill=grouped,F=8192",
        "longheads:L=2048,w=256,sel=one_pass_filter,prefill=grouped,F=8192",
        "longheads:L=2048,w=256,sel=two_pass_prompt,prefill=grouped,F=8192",
        "longheads:L=2048,w=256,sel=one_pass_prompt,prefill=grouped,F=8192",
        "longheads:L=2048,w=256,sel=one_pass_reread,prefill=grouped,F=8192",
    ]
    given = evaluation.parse_method("longheads:sel=one_pass_filter,filter=18", flags, trained)
    assert (given.config.filter_layer, given.name) == (18, designs[4] + ",filter=18")
    bad_methods = ("sparse", "longheads:x=1", "longheads:L=big", "window:w=3", "longheads:score=odd",
                   "longheads:sel=two_pass_carry,score=rotated", "longheads:F=1024", "longheads:sel=pooled")
    for bad in bad_methods:
        with pytest.raises(ValueError):
            evaluation.parse_methods(bad, flags, trained)


def test_quantized_kv_methods_are_named_apart_from_float():
    flags, trained = LongHeadsConfig(), 8192
    methods = evaluation.parse_methods("longheads,longheads:kv=8,longheads:kv=4,longheads:kv=4,kvg=32", flags, trained, 64)
    float_name = f"longheads:L=2048,w=256,sel={DEFAULT},prefill=grouped,F=8192"
    assert [m.name for m in methods] == [float_name, float_name + ",kv=8", float_name + ",kv=4", float_name + ",kv=4,kvg=32"]
    assert [(m.config.kv_bits, m.config.kv_group_size) for m in methods] == [(None, None), (8, 64), (4, 64), (4, 32)]
    # The default group spelled out is the same method; so are the files.
    assert len(evaluation.parse_methods("longheads:kv=8,longheads:kv=8,kvg=64", flags, trained, 64)) == 1
    paths = {results_path(Path("out"), "needle", m.name) for m in methods}
    assert len(paths) == 4
    for bad in ("longheads:kv=3", "longheads:kv=8,kvg=48", "longheads:kvg=32", "full:kv=8", "longheads:kv=eight"):
        with pytest.raises(ValueError):
            evaluation.parse_methods(bad, flags, trained, 64)


@pytest.mark.parametrize("score, forced", [("rotated", "first+prev"), ("raw", "first"), ("raw", "prev")])
def test_selection_ablations_keep_the_window_valid(score, forced):
    config = LongHeadsConfig(16, 64, "query_head", full_attention_length=64)
    model = tiny_model("llama")
    config = apply_longheads(model, config)
    method = evaluation.Method("longheads", config, score=score, forced=forced)
    x = mx.array([[i % 97 for i in range(200)]])
    plain = model(x)
    chosen = []
    with evaluation.selection_variant(method, model):
        variant = longheads.select_chunks
        longheads.select_chunks = lambda *a: chosen.append((a[2], variant(*a))) or chosen[-1][1]
        try:
            out = model(x)
        finally:
            longheads.select_chunks = variant
    assert longheads.select_chunks.__name__ == "select_chunks"  # restored
    assert mx.isfinite(out).all().item() and not mx.allclose(out, plain).item()
    # One call per layer, selecting for the chunks of the queries past F (chunks 4 to 12).
    assert [own.tolist() for own, _ in chosen] == [list(range(4, 13))] * len(model.layers)
    k = config.num_chunks
    for own, slots in chosen:
        slots, own = slots.tolist(), own.tolist()
        for head in slots[0]:
            for group, chunks in zip(own, head):
                assert len(chunks) == k and chunks == sorted(set(chunks)) and chunks[-1] == group
                assert (0 in chunks) == (forced != "prev")
                assert (group - 1 in chunks) == (forced != "first")


def fake_run_sample(task, model, tokenizer, method, n, index, seed, progress, prefixes=None):
    progress(n, n)
    if task == "perplexity":
        return dict(tokens=n, repeats_at=10**6, buckets=[[0, n, 2.0 * (n - 1), n - 1]], nll=2.0, prefill_s=0.0, total_s=0.0)
    return dict(tokens=n, score=1.0, answer=" 1", prefill_s=0.0, total_s=0.0)


@pytest.fixture
def fake_model(monkeypatch):
    embed_tokens = lambda tokens: tokens.astype(mx.float32)  # noqa: E731
    stock = SimpleNamespace(
        args=SimpleNamespace(max_position_embeddings=8192, hidden_size=576, num_attention_heads=9),
        model=SimpleNamespace(embed_tokens=embed_tokens),
    )
    monkeypatch.setattr(evaluation, "load", lambda *a, **k: (stock, None))
    monkeypatch.setattr(evaluation, "run_sample", fake_run_sample)


def test_a_rerun_keeps_finished_samples(tmp_path, fake_model):
    common = ["passkey", "--lengths", "1k,64k", "--methods", "full,window", "--output", str(tmp_path)]
    evaluation.main(common + ["--samples", "2"])
    full = results_path(tmp_path, "passkey", "full")
    before = full.read_text()
    with full.open("a") as f:
        f.write('{"task": "passkey", "meth')  # an interrupted write
    evaluation.main(common + ["--samples", "3"])
    lines = full.read_text().splitlines()
    assert full.read_text().startswith(before) and len(lines) == 6
    records = [json.loads(line) for line in lines]
    assert sorted((r["length"], r["index"]) for r in records) == [
        (1024, 0), (1024, 1), (1024, 2), (65536, 0), (65536, 1), (65536, 2)
    ]
    assert all("skipped" in r for r in records if r["length"] == 65536)  # beyond --max-length-full
    assert {(r["device"], r["dtype"]) for r in records} == {(str(mx.default_device()), "mlx.core.float32")}
    window = results_path(tmp_path, "passkey", "window:L=2048").read_text().splitlines()
    assert len(window) == 6 and all('"score": 1.0' in line for line in window)
    with pytest.raises(SystemExit):
        evaluation.main(common + ["--samples", "3", "--seed", "1"])  # would mix two seeds


def test_quantized_kv_runs_write_their_own_results(tmp_path, fake_model, monkeypatch, embedded):
    loaded, stock = [], embedded

    def load(name, longheads=None):
        loaded.append(longheads)
        return stock

    monkeypatch.setattr(evaluation, "load", load)
    evaluation.main(["passkey", "--lengths", "1k", "--samples", "1", "--methods", "longheads,longheads:kv=4,kvg=32",
                     "--output", str(tmp_path)])
    assert [(c.kv_bits, c.kv_group_size) for c in loaded if c is not None] == [(None, None), (4, 32)]
    name = f"longheads:L=2048,w=256,sel={DEFAULT},prefill=grouped,F=8192"
    for method in (name, name + ",kv=4,kvg=32"):
        assert json.loads(results_path(tmp_path, "passkey", method).read_text())["method"] == method


def test_first_sample_runs_a_later_share_of_the_samples(tmp_path, fake_model):
    common = ["passkey", "--lengths", "1k", "--methods", "full", "--output", str(tmp_path)]
    evaluation.main(common + ["--samples", "2", "--first-sample", "3"])
    evaluation.main(common + ["--samples", "5"])  # 3 and 4 are done
    lines = results_path(tmp_path, "passkey", "full").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [3, 4, 0, 1, 2]


def test_code_version_names_the_checkout_or_else_the_installed_version(tmp_path):
    checkout = Path(evaluation.__file__).parents[1]
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=checkout, capture_output=True, text=True)
    assert evaluation.code_version() == described.stdout.strip() != ""
    installed = tmp_path / "site-packages" / "mlx_longheads"
    assert evaluation.code_version(installed) == f"mlx-longheads {importlib.metadata.version('mlx-longheads')}"


def test_every_record_names_the_code_that_made_it(tmp_path, fake_model, monkeypatch):
    monkeypatch.setattr(evaluation, "code_version", lambda: "abc1234-dirty")
    evaluation.main(["passkey,perplexity", "--lengths", "1k", "--samples", "1", "--methods", "full",
                     "--output", str(tmp_path)])
    for task in ("passkey", "perplexity"):
        assert json.loads(results_path(tmp_path, task, "full").read_text())["commit"] == "abc1234-dirty"


def test_the_report_is_drawn_from_the_results(tmp_path):
    base = dict(model="default", seed=0, trained_length=8192, prefill_s=1.0, total_s=2.0, commit="abc1234")
    records = {
        ("passkey", "full"): [dict(length=n, index=0, score=1.0, tokens=n) for n in (4096, 8192)]
        + [dict(length=16384, index=0, skipped="beyond --max-length-full")],
        ("needle", "window:L=4096"): [
            dict(length=n, index=i, score=float(i % 2), depths=[i / 10], tokens=n)
            for n in (4096, 8192) for i in range(11)
        ],
        ("passkey", "longheads:L=4096"): [dict(length=8192, index=i, score=1.0, tokens=8192, key_chunk=9,
                                                key_chunk_selected=s) for i, s in enumerate((0.5, 0.7))],
        ("perplexity", "full"): [dict(length=4096, index=0, tokens=4096, repeats_at=112955,
                                      buckets=[[0, 1024, 3000.0, 1023], [1024, 2048, 2500.0, 1024]])],
    }
    for (task, method), rows in records.items():
        path = results_path(tmp_path, task, method)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(dict(base, task=task, method=method, **r)) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    assert "| `full` | 1.00 (1) | 1.00 (1) | skipped |" in report
    assert "| `window:L=4096` | 0.45 (11) | 0.45 (11) |" in report
    assert "| `longheads:L=4096` |  | 0.60 (2) |  |" in report  # share of heads holding the key's chunk, at 8k
    assert "| `full` | 18.78 | 11.49 |" in report  # exp(3000/1023), exp(2500/1024)
    for png in ("passkey/score_vs_length.png", "needle/heatmap.png", "perplexity/perplexity_vs_position.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert NO_COMMIT not in report and "removed" not in report


def test_the_report_sets_removed_selections_apart_and_marks_records_without_commit(tmp_path):
    base = dict(task="passkey", model="default", seed=0, trained_length=8192, length=16384, index=0,
                score=1.0, tokens=16384, prefill_s=1.0, total_s=2.0)
    kept = f"longheads:L=2048,w=256,sel={DEFAULT},prefill=grouped,F=8192"
    gone = "longheads:L=2048,w=256,sel=pooled,prefill=grouped,F=8192"  # records of a removed selection
    for method, commit in ((kept, dict(commit="abc1234")), (gone, {})):
        path = results_path(tmp_path, "passkey", method)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(base, method=method, **commit)) + "\n")
    report = write_report(tmp_path).read_text()
    notes, _, tables = report.partition("## passkey")
    library, _, removed = tables.partition("### passkey: removed selections")
    assert f"| `{kept}` | 1.00 (1) |" in library and gone not in library
    assert f"| `{gone}` {NO_COMMIT} | 1.00 (1) |" in removed and kept not in removed
    assert NO_COMMIT_NOTE in notes
    assert "- `sel=pooled` (removed from the library): " in notes and f"- `sel={DEFAULT}` (the default): " in notes
    assert all(selection in SELECTION_NOTES for selection in SELECTIONS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sudoku"], "unknown task 'sudoku'"),
        (["passkey", "--lengths", "4q"], "invalid context length '4q'"),
        (["passkey", "--methods", "full,sparse"], "unknown method 'sparse'"),
        (["report"], "no results under"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(argv, message, tmp_path, fake_model, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluation.main(argv + ["--output", str(tmp_path)])
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_the_command_line_runs_every_method_on_the_embedded_model(tmp_path):
    """Real text, tiny: a LongHeads window of 64 tokens really selects at 160."""
    result = subprocess.run(
        [sys.executable, "-m", "mlx_longheads.eval", "perplexity", "--lengths", "160", "--samples", "1",
         "--methods", "full,window:L=64,longheads:L=64,w=16,F=64", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "[3/3]" in result.stderr
    report = (tmp_path / "report.md").read_text()
    nll = {}
    for method in ("full", "window:L=64", f"longheads:L=64,w=16,sel={DEFAULT},prefill=grouped"):
        assert f"| `{method}` |" in report
        record = json.loads(results_path(tmp_path, "perplexity", method).read_text())
        assert record["tokens"] == 160 and record["buckets"][0][3] == 159 and record["commit"]
        nll[method] = record["nll"]
    assert 1 < nll["full"] < 8 and len(set(nll.values())) == 3


def test_a_question_is_answered_greedily(embedded):
    model, tokenizer = embedded
    seen = []
    record = evaluation.run_sample(
        "needle", model, tokenizer, evaluation.Method("full"), 200, 0, 0, lambda *a: seen.append(a)
    )
    assert record["tokens"] == len(tokenizer.encode(make_sample("needle", tokenizer, 200, 0).prompt))
    assert record["answer"].startswith(record["expected"][0]) and record["score"] == 1.0
    assert record["prefill_s"] > 0 and seen[-1] == (record["tokens"], record["tokens"])


def test_longheads_samples_record_which_heads_hold_the_answers_chunk(embedded):
    """The default selection at small sizes (chunk 32, F = L = 256; 384 tokens: four
    chunks past F), on the shared embedded model."""
    stock, tokenizer = embedded
    config = LongHeadsConfig(32, 256, full_attention_length=256)
    model = with_longheads(stock, config)
    method = evaluation.Method("longheads", config.resolve(8192))
    record = evaluation.run_sample("passkey", model, tokenizer, method, 384, 0, 0, lambda done, total: None)
    by_layer = record["key_chunk_selected_by_layer"]
    assert len(by_layer) == len(model.layers) and all(0 <= share <= 1 for share in by_layer)
    assert record["key_chunk_selected"] == pytest.approx(sum(by_layer) / len(by_layer), abs=1e-4)
    assert 1 <= record["key_chunk"] < 384 // 32

    log = evaluation.SelectionLog()  # the same step, read for chunks every head holds or none does
    prompt = tokenizer.encode(make_sample("passkey", tokenizer, 384, 0, 0).prompt)
    with log.installed():
        evaluation.answer_question(model, tokenizer, prompt, 2, make_prompt_cache(model), log.watch(lambda d, t: None))
    layers = len(model.layers)
    assert log.share_selecting(0, layers) == [1.0] * layers  # the first chunk is forced
    assert log.share_selecting((len(prompt) - 1) // 32, layers) == [1.0] * layers  # the own chunk
    assert log.share_selecting(len(prompt) // 32 + 5, layers) == [0.0] * layers  # not written yet
    short = evaluation.run_sample("passkey", model, tokenizer, method, 200, 0, 0, lambda done, total: None)
    assert "key_chunk_selected" not in short  # below L: no selection


def test_a_prefix_store_shares_the_stock_attention_part_between_selections(monkeypatch):
    """Below F every method with the same F, chunk size and storage computes the same
    cache: the store prefills it once (whole prefill steps) and hands out copies."""
    monkeypatch.setattr(evaluation, "PREFILL_STEP", 64)
    stock = tiny_model("llama")
    prompt = [i * 7 % 97 for i in range(200)]
    models, methods = [], []
    for selection, F in (("query_head", 128), ("two_pass_carry", 128), ("query_head", 64)):
        model = clone(stock)
        config = apply_longheads(model, LongHeadsConfig(16, 64, selection, full_attention_length=F))
        models.append(model)
        methods.append(evaluation.Method("longheads", config))
    store = evaluation.PrefixStore()
    caches = [make_prompt_cache(model) for model in models]
    assert [store.restore(m, method, prompt, c) for m, method, c in zip(models, methods, caches)] == [128, 128, 64]
    assert len(store.caches) == 2  # F = 64 is another prefix
    direct = evaluation.prefilled(models[1], prompt[:128])
    for restored in caches[:2]:
        assert restored[0].offset == 128
        for a, b in zip(restored[-1].state[:4], direct[-1].state[:4]):
            assert mx.array_equal(a, b).item()
    models[0](mx.array([prompt[128:]]), cache=caches[0])  # a copy: the store's cache is unchanged
    assert next(iter(store.caches.values()))[0].offset == 128
    assert store.restore(models[0], methods[0], prompt[:128], make_prompt_cache(models[0])) == 0


def test_merging_runs_keeps_each_sample_once_and_refuses_another_seed(tmp_path, fake_model):
    merge = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "merge_eval_results.py")]
    for name, lengths in (("a", "1k"), ("b", "1k,2k")):
        evaluation.main(["passkey", "--lengths", lengths, "--samples", "2", "--methods", "full",
                         "--output", str(tmp_path / name)])
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    for _ in range(2):  # merging again adds nothing
        subprocess.run(merge + sources + [str(tmp_path / "merged")], check=True)
    merged = results_path(tmp_path / "merged", "passkey", "full").read_text().splitlines()
    assert sorted((r["length"], r["index"]) for r in map(json.loads, merged)) == [
        (1024, 0), (1024, 1), (2048, 0), (2048, 1)
    ]
    evaluation.main(["passkey", "--lengths", "1k", "--samples", "1", "--methods", "full", "--seed", "1",
                     "--output", str(tmp_path / "c")])
    refused = subprocess.run(merge + [str(tmp_path / "c"), str(tmp_path / "merged")], capture_output=True, text=True)
    assert refused.returncode != 0 and "another" in refused.stderr and "Traceback" not in refused.stderr
