"""Do the GGUF route and the Hugging Face route agree on the embedded SmolLM2?

The GGUF route converts SmolLM2-135M-Instruct.Q4_1.gguf (resolve_model(None)). From
that model, dequantized, the script writes a Hugging Face folder (float32 safetensors
under the Hugging Face names, config.json, the tokenizer files) and converts it with
convert_hf, as it is and with -q (4 bits; group size 64, mlx-lm's default, and 32).
It compares the logits of the models on a paragraph of text, all run dequantized in
float32 (MLX's CPU quantized matmul is ~15x slower; the weights are the same), and lets
each -q model, as loaded, answer a chat question.

.venv/bin/python scripts/check_hf_route.py > results/hf_route.txt
"""

import json
import shutil
import tempfile
from pathlib import Path

import mlx_longheads  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model

from mlx_longheads.convert import convert_hf
from mlx_longheads.resolve import resolve_model

TEXT = (
    "Rivers shape the land they cross. Over thousands of years a river cuts a valley, "
    "carries sand and stones downstream and drops them where the water slows, building "
    "plains, islands and deltas. People have always settled beside rivers: they bring water "
    "for drinking and for crops, fish to eat, and a road for boats long before there were "
    "paved roads. Many of the oldest cities grew on the banks of great rivers, such as the "
    "Nile, the Tigris and the Yellow River. Floods were both a danger and a gift, since they "
    "destroyed houses but left fertile soil behind. Engineers later built dams, canals and "
    "locks to control the water, to carry ships inland and to produce electricity. Today "
    "rivers still supply most of the fresh water that cities use, and protecting them from "
    "pollution is one of the main tasks of modern environmental policy."
)


def float32_dequantized(folder: Path):
    model, tokenizer = mlx_lm.load(str(folder))
    model.set_dtype(mx.float32)  # scales first, so the dequantized weights are exact
    return dequantize_model(model), tokenizer


def write_hf_folder(gguf_folder: Path, model, path: Path) -> None:
    """mlx-lm's llama parameters carry the Hugging Face names already."""
    path.mkdir()
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    config = json.loads((gguf_folder / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key)
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(gguf_folder / name, path / name)


def compare(name: str, got: np.ndarray, reference: np.ndarray) -> None:
    diff = np.abs(got - reference)
    agree = (got.argmax(-1) == reference.argmax(-1)).sum()
    print(
        f"{name}: max |logit diff| {diff.max():.3g}, mean {diff.mean():.3g}, "
        f"top-1 agreement {agree}/{len(got)} ({100 * agree / len(got):.1f}%)"
    )


def main() -> None:
    gguf_folder = resolve_model(None)
    reference, tokenizer = float32_dequantized(gguf_folder)
    tokens = tokenizer.encode(TEXT)
    expected = np.array(reference(mx.array([tokens]))[0])
    print(f"text: {len(tokens)} tokens; |logits| up to {np.abs(expected).max():.3g}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_hf_folder(gguf_folder, reference, tmp / "hf")
        convert_hf(str(tmp / "hf"), tmp / "mlx")
        plain, _ = float32_dequantized(tmp / "mlx")
        compare("HF route (float32) vs GGUF route", np.array(plain(mx.array([tokens]))[0]), expected)

        # Re-quantizing adds MLX's 4-bit rounding to Q4_1's (and takes the Q8_0
        # embedding, which is also the output matrix, to 4 bits); 32 is Q4_1's block size.
        for group_size in (64, 32):
            out = tmp / f"mlx-q4-g{group_size}"
            convert_hf(str(tmp / "hf"), out, quantize=True, q_group_size=group_size)
            quantized, q_tokenizer = mlx_lm.load(str(out))
            q_proj = quantized.model.layers[0].self_attn.q_proj
            assert (type(q_proj).__name__, q_proj.bits, q_proj.group_size) == ("QuantizedLinear", 4, group_size)
            q4, _ = float32_dequantized(out)
            compare(
                f"HF route -q (4-bit, group {group_size}) vs GGUF route",
                np.array(q4(mx.array([tokens]))[0]),
                expected,
            )
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            prompt = q_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            answer = mlx_lm.generate(quantized, q_tokenizer, prompt, max_tokens=30)
            print(f"  as loaded (4-bit), greedy answer: {answer!r}")


if __name__ == "__main__":
    main()
