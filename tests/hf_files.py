"""Tiny Hugging Face checkpoints written by the tests."""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from transformers import PreTrainedTokenizerFast

from gguf_files import byte_level_bpe

VOCAB = 300  # the size of gguf_files' byte-level vocabulary


def write_hf_folder(path: Path, model, arch: str) -> Path:
    """The files of a Hugging Face checkpoint: config.json, safetensors, tokenizer.

    mlx-lm's llama, qwen2 and qwen3 parameters have the Hugging Face names already.
    """
    path.mkdir()
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    args = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    config = {**args, "model_type": arch, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(VOCAB), bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.save_pretrained(path)
    return path
