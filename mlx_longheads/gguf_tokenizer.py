"""The Hugging Face tokenizer a GGUF file describes, rebuilt from its metadata.

A GGUF carries no tokenizer.json. llama.cpp keeps the vocabulary, the merges (or the
sentencepiece scores), the token types and the special token ids as metadata, and
names the pre-tokenizer of the original tokenizer.json. This rebuilds that tokenizer
with the `tokenizers` library for the kinds the supported architectures use:
byte-level BPE (SmolLM2, Llama 3, Qwen) and sentencepiece BPE (Llama 2, Mistral).
"""

from typing import Any, Dict, List, Optional, Tuple

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .support import ModelError

# The splits of the original tokenizer.json files (llama.cpp's llama-vocab.cpp has the same).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (normalizer, pre-tokenizer, ignore_merges) of the original tokenizer.json
BYTE_LEVEL = {
    "smollm": (
        None,
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ),
        False,
    ),
    "llama-bpe": (None, _split_then_bytes(_LLAMA3_SPLIT), True),
    "qwen2": (normalizers.NFC(), _split_then_bytes(_QWEN2_SPLIT), False),
}


def _byte_level(meta: Dict[str, Any], vocab: Dict[str, int]) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL:
        raise ModelError(
            f"GGUF tokenizer pre-type {pre!r} is not supported (only {', '.join(BYTE_LEVEL)}): "
            "convert the original Hugging Face model instead"
        )
    normalizer, pre_tokenizer, ignore_merges = BYTE_LEVEL[pre]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_by_score(tokens: List[str], scores: List[float]) -> List[Tuple[str, str]]:
    """Sentencepiece BPE joins the adjacent pair whose joined piece scores best;
    `tokenizers` joins the pair of lowest rank: rank every split of a piece by its score."""
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = sorted(
        (-score, ids[token[:cut]], ids[token[cut:]])
        for token, score in zip(tokens, scores)
        for cut in range(1, len(token))
        if token[:cut] in ids and token[cut:] in ids
    )
    return [(tokens[left], tokens[right]) for _, left, right in ranked]


def _sentencepiece(meta: Dict[str, Any], vocab: Dict[str, int]) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab,
        _merges_by_score(tokens, meta["tokenizer.ggml.scores"]),
        unk_token=None if unk is None else tokens[unk],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    # As sentencepiece and llama.cpp: spaces become ▁, and every stretch of text (the
    # whole text, and each piece after a special token) gets a leading ▁.
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace]) if space_prefix else replace
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


KINDS = {"gpt2": _byte_level, "llama": _sentencepiece}


def gguf_tokenizer(meta: Dict[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer of a GGUF file from its metadata (key -> value), ready to save_pretrained."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in KINDS:
        raise ModelError(
            f"GGUF tokenizer {kind!r} is not supported (only {', '.join(KINDS)}): "
            "convert the original Hugging Face model instead"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = KINDS[kind](meta, vocab)

    types = meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    # Matched whole before any splitting, as llama.cpp does: the special tokens (like
    # <|im_end|>) and the user-defined ones (like <think>).
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, types)
            if token_type in (TokenType.CONTROL, TokenType.UNKNOWN)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, token_type in zip(tokens, types)
            if token_type == TokenType.USER_DEFINED
        ]
    )

    def named(role: str) -> Optional[str]:
        index = meta.get(f"tokenizer.ggml.{role}_token_id")
        return None if index is None else tokens[index]

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=named("bos"),
        eos_token=named("eos"),
        unk_token=named("unknown"),
        pad_token=named("padding"),
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        add_bos_token=meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
        add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
