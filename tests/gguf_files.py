"""Tiny GGUF files written the way llama.cpp's converter writes them, for the tests.

Nothing here comes from the code under test: tensor names are the gguf package's own
name map, Q/K rows are permuted by mlx-lm's GGUF exporter (llama.cpp's permute), and
quantizing and decoding are the gguf package's.
"""

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as GGML
from gguf import GGUFWriter, TokenType
from mlx.utils import tree_flatten
from mlx_lm.gguf import permute_weights
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 2024 the fox ran 365 days!\n"
    "Large language models read tokens; each token is a piece of a word. "
    "Café, naïve, 東京 and emoji 🙂 need bytes.  Two spaces, then\ttabs and\n\nnew lines."
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARCHS = {name: gguf.MODEL_ARCH[name.upper()] for name in ("llama", "qwen2", "qwen3")}
# Types the gguf package cannot quantize, written as random blocks; where each block
# keeps its float16 scales, in bytes (set to 1e-3 to keep the weights small).
RANDOM_BLOCKS = {GGML.Q4_K: (0, 2), GGML.Q6_K: (208,), GGML.Q8_1: (0, 2)}


@dataclass
class Vocab:
    tokens: List[str]
    types: List[int]
    merges: Optional[List[str]] = None  # byte-level BPE
    scores: Optional[List[float]] = None  # sentencepiece


@lru_cache(maxsize=None)
def byte_level_bpe(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE with SmolLM2's pre-tokenizer, trained on TEXT."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    return tokenizer


def byte_level_vocab(vocab_size: int = 300) -> Vocab:
    """The vocabulary as llama.cpp stores it: tokens by id, merges as "a b", specials CONTROL."""
    model = json.loads(byte_level_bpe(vocab_size).to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [TokenType.CONTROL if t in SPECIAL else TokenType.NORMAL for t in tokens]
    return Vocab(tokens, types, merges=[" ".join(m) for m in model["merges"]])


def add_tokenizer(writer: GGUFWriter, vocab: Vocab, pre: str, chat_template: str = CHATML) -> None:
    if vocab.merges is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(vocab.merges)
        writer.add_bos_token_id(vocab.tokens.index("<|im_start|>"))
        writer.add_eos_token_id(vocab.tokens.index("<|im_end|>"))
        writer.add_add_bos_token(False)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(vocab.scores)
        writer.add_bos_token_id(vocab.tokens.index("<s>"))
        writer.add_eos_token_id(vocab.tokens.index("</s>"))
        writer.add_unk_token_id(vocab.tokens.index("<unk>"))
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_chat_template(chat_template)


def random_blocks(shape, qtype: GGML, seed: int = 0) -> np.ndarray:
    """Rows of random blocks of a type that has no quantizer in numpy."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    for offset in RANDOM_BLOCKS[qtype]:
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(
    path: Path,
    model,
    arch: str,
    qtype: GGML = GGML.F32,
    types: Optional[Dict[str, GGML]] = None,
    vocab: Optional[Vocab] = None,
    pre: str = "smollm",
    metadata: Optional[Dict[str, object]] = None,
    extra: Optional[Dict[str, np.ndarray]] = None,
    without: tuple = (),
) -> Dict[str, np.ndarray]:
    """Write an mlx-lm model as a GGUF file; return the weights the file holds, decoded.

    qtype: the type of every 2-D weight; types: per mlx-lm name, overriding it. 1-D
    tensors stay F32, as llama.cpp keeps them. pre: the tokenizer's pre-type; metadata
    and extra: more keys and tensors, written as they are; without: parameters left out.
    The returned weights are in
    mlx-lm's row order (quantizing whole rows commutes with permuting them).
    """
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    add_tokenizer(writer, vocab or byte_level_vocab(args.vocab_size), pre)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))

    names = gguf.get_tensor_name_map(ARCHS.get(arch, gguf.MODEL_ARCH.LLAMA), args.num_hidden_layers)
    held = {}
    for name, weight in tree_flatten(model.parameters()):
        if name in without:
            continue
        w = np.array(weight.astype(mx.float32))
        t = (types or {}).get(name, qtype if w.ndim == 2 else GGML.F32)
        if t in RANDOM_BLOCKS:
            data = random_blocks(w.shape, t)
        elif t == GGML.F16:
            data = w.astype(np.float16)
        elif t == GGML.F32:
            data = w
        else:
            data = gguf.quants.quantize(w, t)
        try:
            held[name] = gguf.quants.dequantize(data, t).astype(np.float32)
        except NotImplementedError:  # undecodable: the converter must refuse the file
            pass
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = args.num_attention_heads if "q_proj" in name else args.num_key_value_heads
            data = permute_weights(data, heads)
        raw_dtype = None if t in (GGML.F32, GGML.F16) else t
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held
