"""Tokenizers: train a small BPE/WordPiece (or character) vocabulary on your captions, or load a pretrained one.

Both kinds answer the same call, ``tokenizer(texts) -> LongTensor (B, context_length)``, padded with ``pad_id`` and
wrapped in begin/end tokens, so a text tower never needs to know which kind fed it. Text longer than the context is
truncated, with a warning that says how many texts were cut (never silently).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
CHAR_ALPHABET = "abcdefghijklmnopqrstuvwxyz"  # always in a char vocabulary, so no unseen word meets [UNK]
VISLANG_TOKENIZER_FILE = "tokenizer.json"
VISLANG_TOKENIZER_META = "vislang_tokenizer.json"
HF_TOKENIZER_SUBDIR = "tokenizer"  # where a Hugging Face tokenizer is saved inside a model directory


# A word-level tokenizer splits punctuation into words of its own, so its decoder writes "a cat , on a mat ." and
# "( business ) company": no space before closing marks, none after opening ones (what Hugging Face's
# clean_up_tokenization does for English).
_SPACE_BEFORE = re.compile(r" +([,.;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{]) +")


def detokenize(text: str) -> str:
    """Text as people write it from a word tokenizer's decoding: ``"( business ) company ,"`` →
    ``"(business) company,"``. Pure; the char tokenizer's output already is (its spaces are tokens)."""
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


class TruncationWarning(UserWarning):
    """Some texts were longer than the context and were cut."""


def _warn_truncated(n: int, total: int, context_length: int) -> None:
    if n:
        warnings.warn(
            f"{n} of {total} text(s) were longer than the context of {context_length} tokens and were truncated; "
            "raise text.context_length in the model config to keep them whole",
            TruncationWarning,
            stacklevel=3,
        )


def _canonical_ids(tok):
    """Renumber a freshly trained vocabulary: specials first, then tokens sorted by string.

    The ``tokenizers`` trainers assign ids in hash-map order, which changes from process to process, so two runs with
    the same seed would get different token ids (and different models). Encoding does not depend on the ids (BPE
    applies its ranked merges, WordPiece matches the longest piece), so renumbering keeps every segmentation.
    """
    from tokenizers import Tokenizer as HFTok

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    order = [t for t in SPECIALS if t in vocab] + sorted(t for t in vocab if t not in SPECIALS)
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for added in data.get("added_tokens", []):
        added["id"] = data["model"]["vocab"][added["content"]]
    return HFTok.from_str(json.dumps(data))


class Tokenizer:
    """A ``tokenizers``-library tokenizer trained on captions (lower-cased, punctuation split)."""

    kind = "vislang"

    def __init__(self, backend, context_length: int = 32) -> None:  # backend: tokenizers.Tokenizer
        self.backend = backend
        self.context_length = context_length
        self.pad_id = backend.token_to_id("[PAD]")
        self.bos_id = backend.token_to_id("[BOS]")
        self.eos_id = backend.token_to_id("[EOS]")
        self.unk_id = backend.token_to_id("[UNK]")
        # One token per character (kind="char"): spaces are tokens there, so decoding keeps them as written. Read
        # once here, not on every decode (the backend builds a new pre-tokenizer object on each access).
        self.is_char = type(backend.pre_tokenizer).__name__ == "Metaspace"

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 2000, kind: str = "bpe", context_length: int = 32
    ) -> Tokenizer:
        """Learn a BPE or WordPiece vocabulary from ``texts``; small vocabularies suit small caption sets.

        ``kind="char"`` gives one token per character (``vocab_size`` is ignored): the letters a-z, a space token and
        any other character of ``texts``. A reader spells every word, seen or not, letter by letter with it, where
        even a tiny BPE merges frequent pairs and marks word ends (``e`` and ``e</w>`` are two tokens to learn).
        """
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        if kind == "char":
            return cls._train_char(texts, context_length)
        if kind == "bpe":
            tok = HFTok(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
            tok.decoder = decoders.BPEDecoder(suffix="</w>")
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=SPECIALS,
                min_frequency=1,
                show_progress=False,
                end_of_word_suffix="</w>",
            )
        elif kind == "wordpiece":
            tok = HFTok(models.WordPiece(unk_token="[UNK]"))
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1, show_progress=False
            )
            tok.decoder = decoders.WordPiece()
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe', 'wordpiece' or 'char'")
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.StripAccents()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
        texts = list(texts)
        if not texts:
            raise ValueError("cannot train a tokenizer on no text; check that the dataset has captions")
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(_canonical_ids(tok), context_length)

    @classmethod
    def _train_char(cls, texts: Iterable[str], context_length: int) -> Tokenizer:
        """A character vocabulary: BPE with no merges; spaces become ``▁`` tokens (Metaspace) so phrases round-trip."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        tok = HFTok(models.BPE(unk_token="[UNK]"))
        # NFD first so StripAccents sees the combining marks: "café" is spelled c-a-f-e, not with an unknown "é"
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.BpeTrainer(
            vocab_size=1,  # below the alphabet's size: the trainer keeps the alphabet and learns no merges
            special_tokens=SPECIALS,
            min_frequency=1,
            show_progress=False,
            initial_alphabet=[*CHAR_ALPHABET, "\u2581"],  # every letter, even one the captions never use; ▁ = space
        )
        texts = list(texts)
        if not texts:
            raise ValueError("cannot train a tokenizer on no text; check that the dataset has captions")
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(_canonical_ids(tok), context_length)

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without specials or padding (for decoders and inspection)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        out = np.full((len(texts), ctx), self.pad_id, dtype=np.int64)
        cut = 0
        for i, ids in enumerate(self.encode_ids(texts)):
            ids = [self.bos_id, *ids, self.eos_id]
            if len(ids) > ctx:
                cut += 1
                ids = ids[: ctx - 1] + [self.eos_id]
            out[i, : len(ids)] = ids
        _warn_truncated(cut, len(texts), ctx)
        return torch.from_numpy(out)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        ids = [int(i) for i in ids]
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = self.backend.decode(ids)
        return text if self.is_char else detokenize(text)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / VISLANG_TOKENIZER_FILE))
        (d / VISLANG_TOKENIZER_META).write_text(json.dumps({"kind": "vislang", "context_length": self.context_length}))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTok

        d = Path(directory)
        meta = json.loads((d / VISLANG_TOKENIZER_META).read_text())
        return cls(HFTok.from_file(str(d / VISLANG_TOKENIZER_FILE)), meta.get("context_length", 32))


class HFTokenizer:
    """A pretrained Hugging Face tokenizer from a local directory (e.g. the MiniLM one), same call as ``Tokenizer``."""

    kind = "hf"

    def __init__(self, path: str | Path, context_length: int = 64) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        self.backend = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.context_length = context_length
        self.pad_id = self.backend.pad_token_id if self.backend.pad_token_id is not None else 0

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        enc = self.backend(list(texts), padding="max_length", truncation=False, max_length=ctx)["input_ids"]
        out = np.full((len(texts), ctx), self.pad_id, dtype=np.int64)
        cut = 0
        sep = self.backend.sep_token_id
        for i, ids in enumerate(enc):
            ids = [t for t in ids if t != self.pad_id]
            if len(ids) > ctx:
                cut += 1
                ids = ids[: ctx - 1] + ([sep] if sep is not None else [ids[ctx - 1]])
            out[i, : len(ids)] = ids
        _warn_truncated(cut, len(texts), ctx)
        return torch.from_numpy(out)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Write the HF files into ``directory/tokenizer/``: beside vislang's own config.json, transformers would
        read that file as the tokenizer's model config and warn about an unknown model type."""
        d = Path(directory)
        (d / HF_TOKENIZER_SUBDIR).mkdir(parents=True, exist_ok=True)
        self.backend.save_pretrained(str(d / HF_TOKENIZER_SUBDIR))
        (d / VISLANG_TOKENIZER_META).write_text(json.dumps({"kind": "hf", "context_length": self.context_length}))


def load_tokenizer(directory: str | Path, context_length: int | None = None) -> Tokenizer | HFTokenizer:
    """Load whichever tokenizer a directory holds (vislang-trained or Hugging Face)."""
    d = Path(directory)
    meta_file = d / VISLANG_TOKENIZER_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("kind") == "vislang":
        tok = Tokenizer.load(d)
    elif meta.get("kind") == "hf" or (d / "tokenizer_config.json").is_file() or (d / "vocab.txt").is_file():
        sub = d / HF_TOKENIZER_SUBDIR
        tok = HFTokenizer(sub if sub.is_dir() else d, meta.get("context_length", 64))
    else:
        raise FileNotFoundError(
            f"no tokenizer in {d}: expected {VISLANG_TOKENIZER_META} (vislang) or tokenizer_config.json/vocab.txt "
            "(Hugging Face); train one with `vislang train` or point to a pretrained tokenizer directory"
        )
    if context_length:
        tok.context_length = context_length
    return tok
