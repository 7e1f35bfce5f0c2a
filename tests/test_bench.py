"""The benchmark runs end to end at tiny sizes and writes what it promises."""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import tiny_model
from mlx_longheads import bench
from mlx_longheads.cache import LongHeadsCache
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.eval import code_version
from mlx_longheads.longheads import chunk_representations, longheads_attention
from mlx_longheads.models import LinkedCall, RereadCall, apply_longheads


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
    assert saved["commit"] == code_version()  # the code that made the record
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
    assert f"at commit {code_version()}." in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    # The bytes a decoded token reads: for the run's model beside its times, and at
    # Llama-3-8B shapes at 32k and 128k, where the default reads most of stock's.
    assert all(r["decode_read_bytes"] > 0 for r in saved["results"])
    reads = {(r["context"], r["method"]): r["total"] for r in saved["reads_llama3_8b"]}
    assert set(reads) == {(c, m) for c in (32768, 131072) for m in ("longheads", "longheads-head", "full")}
    assert reads[131072, "longheads-head"] < reads[131072, "longheads"] < reads[131072, "full"]
    assert "Bytes a decoded token reads, Llama-3-8B shapes" in out.with_suffix(".md").read_text()
    assert any(g["goal"].startswith("longheads: bytes a token reads at 128k") for g in report["goals"])


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


@pytest.mark.parametrize("context", [96, 512], ids=["below-F", "past-F"])
def test_decode_continues_from_a_filled_cache_as_from_an_appended_one(context):
    """fill() lays a cache out as `append` (the path prefill takes) does, so decoding
    continues from it: it holds the same arrays (shapes, dtypes, offset, complete
    chunks) as a cache that appended the same keys and values, and given that cache
    the representations fill() made up (random, not computed from the keys: bench
    measures time, not answers), 17 tokens decoded over either get the same outputs,
    one per step, finite, across the completion of the next chunk; below F (128) and
    past it, where each head selects by the representations."""
    heads, kv_heads, head_dim, w = 4, 2, 16, 16
    config = LongHeadsConfig(w, 64, selection="query_head", full_attention_length=128).resolve(256)
    rope, scale = nn.RoPE(head_dim, base=10000.0), head_dim**-0.5
    filled = LongHeadsCache(w)
    bench.fill(filled, context, 600, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=mx.float32)
    appended = LongHeadsCache(w)
    mx.random.seed(0)
    completed = appended.append(
        mx.random.normal((1, heads, context, head_dim)),
        filled.keys[:, :, :context],
        filled.values[:, :, :context],
    )
    appended.add_representations(chunk_representations(*completed, rope, scale, w))
    assert (filled.offset, filled.complete_chunks) == (appended.offset, appended.complete_chunks) == (context, context // w)
    for a, b in zip(filled.state[:4], appended.state[:4]):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    appended.representations[:, :, : context // w] = filled.representations[:, :, : context // w]

    for step in range(w + 1):
        q, k, v = (mx.random.normal((1, h, 1, head_dim)) for h in (heads, kv_heads, kv_heads))
        outputs = [np.array(longheads_attention(q, k, v, c, rope, scale, config)) for c in (filled, appended)]
        assert np.isfinite(outputs[0]).all()
        np.testing.assert_allclose(*outputs, atol=1e-5, err_msg=f"step {step}")
    assert filled.offset == context + w + 1 and filled.complete_chunks == context // w + 1
    np.testing.assert_allclose(
        np.array(filled.representations[:, :, context // w]), np.array(appended.representations[:, :, context // w]), atol=1e-5
    )


def test_switching_methods_switches_attention_and_the_linked_call():
    """The model bench switches one model between methods: a selection that links layers
    mixes its call into the model's class once (the default its own), and stock attention
    or a selection that does not take it out again."""
    model = tiny_model("llama")
    stock, own_class = [layer.self_attn for layer in model.layers], type(model)
    for _ in range(2):
        bench.use_method(model, stock, bench.METHODS["longheads"])  # the default: one_pass_reread
        assert type(model).__bases__ == (RereadCall, own_class)
        bench.use_method(model, stock, bench.METHODS["longheads-one-pass"])
        assert type(model).__bases__ == (LinkedCall, own_class)
    bench.use_method(model, stock, bench.METHODS["longheads-head"])  # one pass
    assert type(model) is own_class
    bench.use_method(model, stock, None)
    assert type(model) is own_class
    assert all(layer.self_attn is attention for layer, attention in zip(model.layers, stock))
