import subprocess
import sys

import mlx_longheads  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from mlx_lm.models import llama, qwen2, qwen3

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=97,
    max_position_embeddings=256,
    rope_theta=10000.0,
)

ARCHITECTURES = {
    "llama": (llama, dict(model_type="llama")),
    "qwen2": (qwen2, dict(model_type="qwen2")),
    "qwen3": (qwen3, dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True)),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A random float32 model of the given mlx-lm architecture with GQA (4 heads, 2 KV)."""
    module, extra = ARCHITECTURES[arch]
    args = module.ModelArgs(**{**TINY, **extra, **overrides})
    mx.random.seed(seed)
    model = module.Model(args)
    # Larger weights than the default init make attention patterns (and selection) sharp.
    model.update(
        {"model": {"embed_tokens": {"weight": mx.random.normal((args.vocab_size, args.hidden_size))}}}
    )
    mx.eval(model.parameters())
    return model


def clone(model):
    """The same architecture and weights, as a separate model."""
    copy = type(model)(model.args)
    copy.update(model.parameters())
    return copy


def run_module(*args: str, stdin=None) -> subprocess.CompletedProcess:
    """`python -m <args>` as a user runs it: its exit status, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input ends a tool with exit status 1 and one line on stderr naming the fix."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param
