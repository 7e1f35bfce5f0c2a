"""The filter layer of "one_pass_filter": found on the loaded model, once, and refused clearly."""

import json

import numpy as np
import pytest

from conftest import tiny_model
from mlx_longheads import calibrate
from mlx_longheads.config import ConfigError, LongHeadsConfig
from mlx_longheads.models import apply_longheads

CONFIG = LongHeadsConfig(8, 32, selection="one_pass_filter", full_attention_length=64)


@pytest.mark.parametrize("chunk_size, chunks", [(8, 6), (8, 8), (256, 12)])
def test_a_calibration_prompt_ends_with_the_start_of_a_segment_planted_in_a_candidate_chunk(chunk_size, chunks):
    prompts = calibrate.calibration_prompts(49152, chunk_size, chunks)
    assert prompts == calibrate.calibration_prompts(49152, chunk_size, chunks)  # the same every time
    assert len({chunk for _, chunk in prompts}) == min(calibrate.PROMPTS, chunks - 3)  # other depths
    cue = max(chunk_size // 16, 2)
    for tokens, chunk in prompts:
        assert len(tokens) == chunks * chunk_size  # the last token in the last chunk: own = chunks - 1
        assert 1 <= chunk <= chunks - 3  # a candidate: 1 .. own - 2
        start = chunk * chunk_size + max(chunk_size // 4, 4)
        assert tokens[-cue:] == tokens[start : start + cue]
        assert min(tokens) >= 49152 // 8 and max(tokens) < 49152 // 2  # clear of special tokens


def test_the_filter_layer_is_the_best_on_average_over_the_prompts(monkeypatch):
    """Per prompt, one layer's share on the planted chunk can be the largest by chance:
    the mean over the prompts decides."""
    shares = iter([np.array([0.9, 0.3, 0.1]), np.array([0.0, 0.4, 0.1]), np.array([0.0, 0.4, 0.1])])
    monkeypatch.setattr(calibrate, "planted_shares", lambda *args: next(shares))
    found = calibrate.calibrate(tiny_model("llama"), CONFIG.resolve(256))
    assert found.layer == 1 and found.shares == [0.3, 0.3667, 0.1]


def test_applying_the_selection_calibrates_once_per_model_and_keeps_the_layer(monkeypatch, tmp_path, capfd):
    """The first apply measures the tiny model (saying so on stderr, which a long
    calibration needs) and writes the layer to the cache folder; the next apply reads it
    (no measurement), and the model's layers and relay use it."""
    monkeypatch.setenv("MLX_LONGHEADS_CACHE", str(tmp_path))
    calls = []
    measure = calibrate.calibrate
    monkeypatch.setattr(calibrate, "calibrate", lambda *args: calls.append(1) or measure(*args))
    layers = []
    for _ in range(2):
        model = tiny_model("llama")
        config = apply_longheads(model, CONFIG)
        assert config.filter_layer in (0, 1) and model.relay.layer == config.filter_layer
        assert all(layer.self_attn.config.filter_layer == config.filter_layer for layer in model.layers)
        layers.append(config.filter_layer)
    assert calls == [1] and layers[0] == layers[1]
    out, err = capfd.readouterr()
    assert out == "" and err.count(f"Calibrated the filter layer: {layers[0]} of 2") == 1
    (stored,) = (tmp_path / "calibration").glob("*.json")
    assert json.loads(stored.read_text())["layer"] == layers[0]


def test_a_given_filter_layer_is_used_without_calibrating(monkeypatch):
    monkeypatch.setattr(calibrate, "calibrate", lambda *args: pytest.fail("calibrated"))
    model = tiny_model("llama", seed=5)
    assert apply_longheads(model, LongHeadsConfig(8, 32, selection="one_pass_filter", filter_layer=0)).filter_layer == 0
    assert model.relay.layer == 0


def test_the_calibration_runs_the_models_own_attention_whatever_f_is():
    """F = L (the paper's threshold, 4 chunks here) is shorter than a calibration prompt
    (12 chunks): the prompts still run inside the trained length with the model's own
    attention, so the layer and shares are those found with F at the trained length,
    and the model keeps its F afterwards."""
    found = []
    for F in (32, 256):
        model = tiny_model("llama", seed=3)
        config = apply_longheads(model, LongHeadsConfig(8, 32, selection="one_pass_filter", full_attention_length=F, filter_layer=0))
        found.append(calibrate.calibrate(model, config))
        assert all(layer.self_attn.config == config for layer in model.layers)
    assert found[0] == found[1]


@pytest.mark.parametrize(
    "config, message",
    [
        (LongHeadsConfig(64, 256, selection="one_pass_filter"),
         "calibrates its filter layer on 6 chunks or more inside the model's trained length, which holds 4 of 64"),
        (LongHeadsConfig(8, 32, selection="one_pass_filter", filter_layer=2),
         "filter_layer 2 is past the model's last layer (1)"),
        (LongHeadsConfig(8, 32, selection="query_head", filter_layer=1),
         "filter_layer 1 applies to the one_pass_filter, two_pass_prompt, one_pass_prompt and one_pass_reread selections only"),
    ],
)
def test_a_filter_layer_that_cannot_work_is_refused_in_one_line(config, message):
    with pytest.raises(ConfigError) as refused:
        apply_longheads(tiny_model("llama"), config)
    assert message in str(refused.value) and "\n" not in str(refused.value)
