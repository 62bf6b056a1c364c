"""BERT WordPiece tokenizer in pure Python (the rules of Hugging Face `BertTokenizer`).

Basic tokenization (drop control characters, map whitespace to spaces, space out CJK
characters, lowercase + strip accents when `do_lower_case`, split off punctuation), then
greedy longest-match-first WordPiece with `##` continuations. A word longer than 100
characters, or one WordPiece cannot cover, becomes a single `[UNK]`. Special tokens
written literally in the text ("[SEP]") map to their ids, as in Hugging Face.
"""

from __future__ import annotations

import functools
import pathlib
import re
import unicodedata
from typing import Sequence

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_whitespace(ch: str) -> bool:
  return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  if ch in "\t\n\r":
    return False
  return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # All non-alphanumeric ASCII counts ("^", "$", "`" are not Unicode punctuation).
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _clean(text: str) -> str:
  out = []
  for ch in text:
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD or _is_control(ch):
      continue
    if _is_cjk(cp):
      out += [" ", ch, " "]
    else:
      out.append(" " if _is_whitespace(ch) else ch)
  return "".join(out)


def _strip_accents(text: str) -> str:
  return "".join(ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn")


def _split_punctuation(word: str) -> list[str]:
  pieces, current = [], []
  for ch in word:
    if _is_punctuation(ch):
      if current:
        pieces.append("".join(current))
        current = []
      pieces.append(ch)
    else:
      current.append(ch)
  if current:
    pieces.append("".join(current))
  return pieces


def load_vocab(path) -> dict[str, int]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"WordPiece vocabulary not found: {path}")
  with path.open(encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f)}


class WordPieceTokenizer:
  """`tokenize(text) -> [str]`, `encode_batch(texts, max_length) -> (ids, mask)`."""

  def __init__(self, vocab: dict[str, int], *, do_lower_case: bool = True,
               strip_accents: bool | None = None, max_chars_per_word: int = 100):
    self.vocab = vocab
    self.do_lower_case = do_lower_case
    # None = follow do_lower_case (Hugging Face's default).
    self.strip_accents = do_lower_case if strip_accents is None else strip_accents
    self.max_chars_per_word = max_chars_per_word
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise ValueError(f"WordPiece vocabulary lacks the special tokens {missing}")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
    self._special = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
    self._wordpiece = functools.lru_cache(maxsize=1 << 16)(self._wordpiece_uncached)

  @classmethod
  def from_file(cls, vocab_file, **kwargs) -> "WordPieceTokenizer":
    return cls(load_vocab(vocab_file), **kwargs)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def _basic(self, text: str) -> list[str]:
    words = []
    for word in unicodedata.normalize("NFC", _clean(text)).split():
      if self.do_lower_case:
        word = word.lower()
      if self.strip_accents:
        word = _strip_accents(word)
      words += _split_punctuation(word)
    return words

  def _wordpiece_uncached(self, word: str) -> tuple[str, ...]:
    if len(word) > self.max_chars_per_word:
      return ("[UNK]",)
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          break
        end -= 1
      if end == start:  # no piece covers word[start:]: the whole word is unknown
        return ("[UNK]",)
      pieces.append(piece)
      start = end
    return tuple(pieces)

  def tokenize(self, text: str) -> list[str]:
    tokens = []
    for i, chunk in enumerate(self._special.split(text)):
      if i % 2:  # a literal special token
        tokens.append(chunk)
        continue
      for word in self._basic(chunk):
        tokens += self._wordpiece(word)
    return tokens

  def encode(self, text: str) -> list[int]:
    """Token ids without [CLS]/[SEP]."""
    return [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)]

  def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] tokens [SEP], truncated to `max_length` and padded: int32 ids, mask [N, max_length]."""
    if max_length < 2:
      raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      tokens = [self.cls_id] + self.encode(text)[:max_length - 2] + [self.sep_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask
