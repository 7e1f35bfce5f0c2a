"""The benchmark runs end to end at tiny sizes and writes what it promises."""

import json
import sys

import mlx.core as mx
import pytest

from conftest import tiny_model
from mlx_longheads import bench
from mlx_longheads.cache import LongHeadsCache
from mlx_longheads.models import TwoPassCall, apply_longheads


@pytest.fixture
def tiny_load(monkeypatch):
    """bench's load() gives tiny llama models (trained length 256: chunk 16, L 64)."""

    def load(model=None, longheads=None, max_context=None):
        m = tiny_model("llama")
        if longheads is not None:
            apply_longheads(m, longheads)
        return m, None

    # The package's `load` function hides its module of the same name.
    monkeypatch.setattr(sys.modules["mlx_longheads.load"], "load", load)


def test_model_bench_writes_json_markdown_and_plot(tmp_path, tiny_load):
    out = tmp_path / "bench"
    report = bench.main(
        ["--contexts", "256,512", "--decode-steps", "2", "--prefill-block", "40",
         "--full-prefill-max", "256", "--output", str(out)]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["command"].startswith("python -m mlx_longheads.bench --contexts 256,512")
    assert {(r["context"], r["method"]) for r in saved["results"]} == {
        (c, m) for c in (256, 512) for m in ("longheads", "longheads-head", "full")
    }
    for r in saved["results"]:
        assert r["decode_ms"] > 0 and len(r["decode_ms_all"]) == 2
        assert r["peak_over_weights_kv"] > 0
        has_prefill = not (r["method"] == "full" and r["context"] == 512)
        assert ("prefill_tokens_per_s" in r) == has_prefill
    assert any(g["goal"].startswith("longheads: decode") for g in report["goals"])
    assert "| 512 | longheads |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_kernel_bench_reports_bytes_and_bandwidth(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "LLAMA3_8B", dict(heads=4, kv_heads=2, head_dim=16, trained_length=256, rope_base=1e4))
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 1.0)
    out = tmp_path / "kernel"
    report = bench.main(["--kernel", "--contexts", "256,512", "--decode-steps", "2",
                         "--prefill-block", "40", "--output", str(out)])
    rows = {(r["context"], r["method"]): r for r in report["results"]}
    assert len(rows) == 6
    # Full attention reads the whole cache; LongHeads its k chunks per selecting head, and
    # the default (two_pass_carry, one pass here) every key once more for the layer's attention.
    assert rows[512, "full"]["decode_bytes"] > rows[256, "full"]["decode_bytes"]
    assert rows[512, "longheads-head"]["decode_bytes"] < rows[512, "longheads"]["decode_bytes"]
    assert all(r["decode_gb_per_s"] > 0 and r["prefill_gb_per_s"] > 0 for r in rows.values())
    assert "GB/s" in out.with_suffix(".md").read_text()


def test_a_filled_cache_continues_like_a_prefilled_one():
    """fill() leaves a LongHeads cache in a state decode can continue from."""
    cache = LongHeadsCache(32)
    bench.fill(cache, 512, 600, heads=4, kv_heads=2, head_dim=16, dtype=mx.float32)
    assert cache.offset == 512 and cache.complete_chunks == 16
    assert cache.keys.shape == (1, 2, 608, 16) and cache.representations.shape == (1, 4, 19, 16)


def test_switching_methods_switches_attention_and_the_two_pass_call():
    """The model bench switches one model between methods: the default (two_pass_carry)
    mixes its call into the model's class once, and stock attention takes it out again."""
    model = tiny_model("llama")
    stock, own_class = [layer.self_attn for layer in model.layers], type(model)
    for _ in range(2):
        bench.use_method(model, stock, bench.METHODS["longheads"])  # the default: two_pass_carry
        assert type(model).__bases__ == (TwoPassCall, own_class)
    bench.use_method(model, stock, bench.METHODS["longheads-head"])  # one pass
    assert type(model) is own_class
    bench.use_method(model, stock, None)
    assert type(model) is own_class
    assert all(layer.self_attn is attention for layer, attention in zip(model.layers, stock))
