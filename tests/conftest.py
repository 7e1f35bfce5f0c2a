import atexit
import os
import shutil
import tempfile
from pathlib import Path

# This run's caches, before anything reads the variables (huggingface_hub reads HF_HOME
# when imported) and so that every tool a test starts inherits them: the embedded model
# is converted into a folder of the run's own, and no test reads or writes the user's
# ~/.cache. Removed when the run ends.
RUN_CACHE = Path(tempfile.mkdtemp(prefix="mlx-longheads-tests-"))
os.environ["MLX_LONGHEADS_CACHE"] = str(RUN_CACHE / "mlx-longheads")
os.environ["HF_HOME"] = str(RUN_CACHE / "huggingface")
for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):  # would beat HF_HOME
    os.environ.pop(variable, None)
atexit.register(shutil.rmtree, RUN_CACHE, True)

import subprocess  # noqa: E402
import sys  # noqa: E402

import mlx_longheads  # noqa: F401, E402  (loads OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from mlx_lm.models import llama, qwen2, qwen3  # noqa: E402

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

# The most two float32 computations of the embedded model's logits differ by where they
# take different paths to the same tokens: LongHeads below its full attention length
# against stock attention (test_models allows 2e-3), a prompt prefilled whole against
# one continued from a cache, batched or not. Measured: 8e-5 and 6e-5. Where every
# greedy step of an answer wins by more than twice this, both paths give its tokens.
ROUNDING = 2e-3


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


def with_longheads(model, config):
    """A copy of `model` (its weights shared, not copied) with LongHeads attention, as
    `load(longheads=config)` gives it; the model itself is left as it was."""
    from mlx_longheads.models import apply_longheads

    copy = clone(model)
    apply_longheads(copy, config)
    return copy


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded SmolLM2's MLX folder, converted into this run's cache: once per run
    (later loads, and the tools a test starts, find it there)."""
    from mlx_longheads.resolve import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def embedded(embedded_folder):
    """The embedded model as `load(longheads=None)` gives it (float32 on the CPU, stock
    attention) and its tokenizer, loaded once for the run. Tests only read it; one that
    needs LongHeads takes `with_longheads(model, config)`."""
    from mlx_longheads import load

    return load(longheads=None)


def run_module(*args: str, stdin=None) -> subprocess.CompletedProcess:
    """`python -m <args>` as a user runs it: its exit status, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=600
    )


def run_main(main, *argv: str, capfd, stdin: str = "") -> subprocess.CompletedProcess:
    """A tool's `main(argv)` called in this process, read as `run_module` reads the tool:
    its exit status (0 when it returns), stdout and stderr. For what a new process adds
    nothing to: it saves the interpreter's start and the imports."""
    import io

    capfd.readouterr()  # what came before
    old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdin = old_stdin
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["main", *argv], code, out, err)


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
