"""Character-level tokenizer for the toy world, built with `tokenizers` and saved as a HF tokenizer."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# 64 symbols in all: specials, letters, digits and the punctuation the toy tasks use.
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789=+-*/()[]<>:;,.?! _#@$%&"


def build_char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """One token per character; `<bos>` is prepended to every encoded text."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in characters:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def save_char_tokenizer(path: str | Path, characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    tok = build_char_tokenizer(characters)
    tok.save_pretrained(str(path))
    return tok
