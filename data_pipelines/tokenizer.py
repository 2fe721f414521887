"""The text tokenizer: BPE through Hugging Face `tokenizers`, with TV2TV's four special tokens.

Two ways to get one::

    tok = train_bpe(toy_world_corpus(), vocab_size=128, byte_level=False)  # the toy world
    tok = load_tokenizer("path/to/tokenizer.json")                          # e.g. Llama-3's

    ids = tok.encode("left fire")       # int32[N], never contains a special token
    tok.decode(ids)                     # "left fire"
    tok.config_overrides()              # {"seq": {"pad_id": 0, "bof_id": 1, ...},
                                        #  "model": {"vocab_size": ...}}
    check_compatible(tok, exp)          # ConfigError naming the field if they disagree

Special tokens. The interleaved sequence (`tv2tv_jax.sequence`, its module doc) needs
four ids that are real vocabulary entries: pad, BOF (begin of frame chunk), EOF (end of
chunk) and EOS (end of example). `train_bpe` registers PAD, BOF, EOF, EOS (the constants
below) first, so they get ids 0, 1, 2, 3, the defaults of `SequenceConfig`. A Llama-3
`tokenizer.json` has no such tokens but reserves 250 special ones; LLAMA3_SPECIALS maps
  pad -> <|reserved_special_token_2|>   (128004 in Llama-3.0, 128005 in Llama-3.1/3.2)
  BOF -> <|reserved_special_token_0|>   (128002)
  EOF -> <|reserved_special_token_1|>   (128003)
  EOS -> <|end_of_text|>                (128001)
Reserved tokens are used rather than e.g. <|eot_id|> so that a chat-tuned checkpoint's
meaning of its own tokens is never overloaded; ids are always looked up by name, never
hard-coded, so the 3.0/3.1 difference for pad is harmless.

Text never yields a special id: `encode` splits special-token strings appearing in the
text into ordinary pieces (`encode_special_tokens`), so "<|bof|>" typed by a user is
text, not a chunk boundary (the layout rejects specials inside text).

Unknown characters. Byte-level BPE (`byte_level=True`, and Llama-3) encodes any string:
there is no unknown character. Character-level BPE (`byte_level=False`, needed when the
vocabulary is smaller than 256 + 4, as in the toy configs) knows only the characters of
its training corpus; `encode` raises `UnknownCharacterError` naming the text and the
character rather than dropping it (HF BPE without an unk token would drop it silently).

Round trip: `decode(encode(s)) == s` exactly for every string the tokenizer can encode
(no prefix space is added, no normalizer is used).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tv2tv_jax.config import ConfigError

# The special tokens of our own tokenizers, registered in this order (ids 0..3).
PAD = "<|pad|>"
BOF = "<|bof|>"
EOF = "<|eof|>"
EOS = "<|eos|>"
ROLES = ("pad", "bof", "eof", "eos")  # order = SequenceConfig field order (pad_id, bof_id, ...)
NATIVE_SPECIALS = {"pad": PAD, "bof": BOF, "eof": EOF, "eos": EOS}
LLAMA3_SPECIALS = {
    "pad": "<|reserved_special_token_2|>",
    "bof": "<|reserved_special_token_0|>",
    "eof": "<|reserved_special_token_1|>",
    "eos": "<|end_of_text|>",
}
# load_tokenizer tries these role maps in order when none is given.
KNOWN_SPECIALS = (NATIVE_SPECIALS, LLAMA3_SPECIALS)
# Metaspace marker for spaces in character-level BPE (SentencePiece's U+2581).
_SPACE = "\u2581"


class UnknownCharacterError(ValueError):
  """A text holds a character that a character-level tokenizer cannot encode."""


class SpecialTokenError(ValueError):
  """A tokenizer lacks one of the special tokens a role map names."""


class TokenizerFileError(ValueError):
  """A tokenizer.json is not JSON, or JSON that `tokenizers` cannot read; names the file."""


def _read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
  """The `Tokenizer` in a tokenizer.json; TokenizerFileError naming the file if unreadable.

  `tokenizers` raises a bare Exception quoting serde ("expected `,` or `}` at line 1 column
  5") without the file name, and reports a JSON syntax error as a schema error; parsing the
  JSON first tells the two apart.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:  # a missing file: FileNotFoundError names it
    raw = f.read()
  try:
    text = raw.decode("utf-8")
    json.loads(text)
  except ValueError as e:  # UnicodeDecodeError, json.JSONDecodeError
    raise TokenizerFileError(f"{path}: not valid UTF-8 JSON: {e}") from e
  try:
    return Tokenizer.from_str(text)
  except Exception as e:
    raise TokenizerFileError(f"{path}: JSON, but not a Hugging Face tokenizer.json: "
                             f"{e}") from e


def _is_byte_level(tok: Tokenizer) -> bool:
  """Whether every string is encodable: a ByteLevel pre-tokenizer/decoder or byte fallback."""
  spec = json.loads(tok.to_str())
  def has_byte_level(node):
    if isinstance(node, dict):
      return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
    if isinstance(node, list):
      return any(has_byte_level(v) for v in node)
    return False
  model = spec.get("model") or {}
  return (has_byte_level(spec.get("pre_tokenizer")) or has_byte_level(spec.get("decoder"))
          or bool(model.get("byte_fallback")))


@dataclasses.dataclass
class TextTokenizer:
  """A `tokenizers.Tokenizer` plus the ids of its four special tokens.

  Attributes:
    tokenizer: the Hugging Face tokenizer.
    specials: role ("pad", "bof", "eof", "eos") -> token string in the vocabulary.
  """
  tokenizer: Tokenizer
  specials: Mapping[str, str]

  def __post_init__(self):
    self.specials = dict(self.specials)
    missing = [r for r in ROLES if r not in self.specials]
    if missing:
      raise SpecialTokenError(f"role map lacks roles {missing}; it needs {ROLES}")
    ids = {}
    for role in ROLES:
      tid = self.tokenizer.token_to_id(self.specials[role])
      if tid is None:
        raise SpecialTokenError(f"special token {self.specials[role]!r} (role {role}) is not "
                                f"in the tokenizer's vocabulary")
      ids[role] = tid
    if len(set(ids.values())) != len(ROLES):
      raise SpecialTokenError(f"special roles must map to distinct ids, got {ids}")
    self._ids = ids
    # Text containing e.g. "<|bof|>" must be encoded as text, never as the special id.
    self.tokenizer.encode_special_tokens = True
    self._byte_level = _is_byte_level(self.tokenizer)
    self._unk_id = self._unk_token_id()
    self._alphabet = None if self._byte_level else self._single_chars()

  # ------------------------------------------------------------------ ids
  @property
  def pad_id(self) -> int:
    return self._ids["pad"]

  @property
  def bof_id(self) -> int:
    return self._ids["bof"]

  @property
  def eof_id(self) -> int:
    return self._ids["eof"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  @property
  def special_ids(self) -> dict[str, int]:
    """Role -> id, e.g. {"pad": 0, "bof": 1, "eof": 2, "eos": 3}."""
    return dict(self._ids)

  @property
  def vocab_size(self) -> int:
    """Number of ids, added (special) tokens included: every id is < vocab_size."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def byte_level(self) -> bool:
    return self._byte_level

  # ------------------------------------------------------------------ text
  def _unk_token_id(self) -> int | None:
    unk = getattr(self.tokenizer.model, "unk_token", None)
    return None if unk is None else self.tokenizer.token_to_id(unk)

  def _single_chars(self) -> frozenset[str]:
    chars = {t for t in self.tokenizer.get_vocab(with_added_tokens=False) if len(t) == 1}
    if _SPACE in chars:  # the Metaspace marker stands for " "; a literal marker is not text
      chars = (chars - {_SPACE}) | {" "}
    return frozenset(chars)

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32[N] token ids, no special tokens added (N = 0 for "").

    Raises:
      UnknownCharacterError: a character-level tokenizer meets a character outside its
        alphabet, or the model emits its unk token; the message names the text.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}: {text!r}")
    if self._alphabet is not None:
      for i, ch in enumerate(text):
        if ch not in self._alphabet:
          raise UnknownCharacterError(f"text {text!r}: character {ch!r} (U+{ord(ch):04X}) at "
                                      f"index {i} is not in the tokenizer's alphabet")
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if self._unk_id is not None and self._unk_id in ids:
      raise UnknownCharacterError(f"text {text!r}: encoded to the unknown token at position "
                                  f"{ids.index(self._unk_id)}")
    return np.asarray(ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
    """int[N] ids -> text; special tokens are dropped unless skip_special_tokens=False."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  # ------------------------------------------------------------------ io, configs
  def save(self, path: str | os.PathLike) -> None:
    """Writes `tokenizer.json` at `path`; `load_tokenizer(path)` restores an equal tokenizer."""
    self.tokenizer.save(os.fspath(path))

  def config_overrides(self, vocab_multiple: int = 1) -> dict[str, dict[str, int]]:
    """See module-level `config_overrides`."""
    return config_overrides(self, vocab_multiple)


def train_bpe(texts: Iterable[str], vocab_size: int, *, byte_level: bool = True,
              min_frequency: int = 1) -> TextTokenizer:
  """Trains a BPE tokenizer on `texts` with PAD, BOF, EOF, EOS as ids 0, 1, 2, 3.

  Args:
    texts: the corpus (e.g. `toy_world_corpus()`); iterated once per call.
    vocab_size: the largest vocabulary wanted, specials included. The result can be smaller
      when the corpus runs out of merges; read `TextTokenizer.vocab_size`.
    byte_level: byte-level BPE (any string encodable; needs vocab_size >= 260) or
      character-level BPE over the corpus's characters (unknown characters raise).
    min_frequency: a pair must occur this often to be merged.
  """
  texts = list(texts)
  specials = [NATIVE_SPECIALS[r] for r in ROLES]
  tok = Tokenizer(models.BPE(unk_token=None))
  if byte_level:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
      raise ValueError(f"byte-level BPE needs vocab_size >= {len(alphabet) + len(specials)} "
                       f"(256 bytes + {len(specials)} specials), got {vocab_size}; use "
                       f"byte_level=False for smaller vocabularies")
    # No prefix space: decode(encode(s)) == s exactly, as in Llama-3.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
  else:
    alphabet = sorted(set("".join(texts)) - {" "} | {_SPACE})
    if vocab_size < len(alphabet) + len(specials):
      raise ValueError(f"the corpus has {len(alphabet)} symbols; vocab_size={vocab_size} "
                       f"cannot hold them plus {len(specials)} specials")
    # Spaces become a visible marker so that words keep their boundaries in merges;
    # prepend_scheme='never' keeps the round trip exact.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="never")
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=specials, initial_alphabet=alphabet,
                                limit_alphabet=len(alphabet), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return TextTokenizer(tok, NATIVE_SPECIALS)


def load_tokenizer(path: str | os.PathLike,
                   specials: Mapping[str, str] | None = None) -> TextTokenizer:
  """Loads a `tokenizer.json` (ours, or e.g. Llama-3's).

  Args:
    path: the tokenizer.json file.
    specials: role -> token string; default: the first of KNOWN_SPECIALS (ours, then
      LLAMA3_SPECIALS) whose four tokens are all in the vocabulary.
  Raises:
    TokenizerFileError: the file is not JSON or not a tokenizer.json, naming it.
    SpecialTokenError: no role map fits, naming the tokens that are missing.
  """
  tok = _read_tokenizer_file(path)
  if specials is not None:
    return TextTokenizer(tok, specials)
  missing = {}
  for candidate in KNOWN_SPECIALS:
    absent = [t for t in candidate.values() if tok.token_to_id(t) is None]
    if not absent:
      return TextTokenizer(tok, candidate)
    missing[candidate["bof"]] = absent
  raise SpecialTokenError(f"{os.fspath(path)}: no known special-token map fits (missing: "
                          f"{missing}); pass specials={{'pad': ..., 'bof': ..., 'eof': ..., "
                          f"'eos': ...}} naming tokens of this vocabulary")


def config_overrides(tok: TextTokenizer, vocab_multiple: int = 1) -> dict[str, dict[str, int]]:
  """The config values that make a model match `tok`.

  Returns {"seq": {"pad_id", "bof_id", "eof_id", "eos_id"}, "model": {"vocab_size"}}, ready
  for `cfg.seq.update(**o["seq"]); cfg.model.update(**o["model"])` on a ConfigDict.
  vocab_size is rounded up to a multiple of `vocab_multiple` (e.g. 128 for TPU-friendly
  embedding shapes); the extra rows are never produced by the tokenizer.
  """
  if vocab_multiple < 1:
    raise ValueError(f"vocab_multiple must be >= 1, got {vocab_multiple}")
  vocab = -(-tok.vocab_size // vocab_multiple) * vocab_multiple
  return {"seq": {f"{r}_id": tok.special_ids[r] for r in ROLES},
          "model": {"vocab_size": vocab}}


def check_compatible(tok: TextTokenizer, exp: Any) -> None:
  """Raises ConfigError naming the field where `exp` (an Experiment, or anything with
  `.seq` and `.model` sections, e.g. a ConfigDict) disagrees with `tok`.

  Compatible means: seq.{pad,bof,eof,eos}_id equal the tokenizer's ids, and
  model.vocab_size >= tok.vocab_size (a larger, padded embedding is fine).
  """
  for role in ROLES:
    field = f"{role}_id"
    got, want = int(getattr(exp.seq, field)), tok.special_ids[role]
    if got != want:
      raise ConfigError(f"seq.{field}", f"is {got} but the tokenizer's {role} token "
                        f"{tok.specials[role]!r} has id {want}")
  vocab = int(exp.model.vocab_size)
  if vocab < tok.vocab_size:
    raise ConfigError("model.vocab_size", f"is {vocab} but the tokenizer has {tok.vocab_size} "
                      f"ids; token ids up to {tok.vocab_size - 1} would be out of range")


def toy_world_corpus(num_clips: int = 32, num_chunks: int = 16,
                     caption_every: Sequence[int] = (2, 4, 8), seed: int = 0) -> list[str]:
  """Training texts for the toy world: every VOCAB word, action texts and sparse captions.

  Deterministic in `seed`; clips use seeds seed .. seed + num_clips - 1. Includes every
  word of `toy_world.VOCAB` and every `COUNT_WORDS` phrase so the alphabet and common merges
  are always covered.
  """
  from data_pipelines import toy_world  # local: keeps tokenizer import light

  texts = list(toy_world.VOCAB) + [c for c in toy_world.COUNT_WORDS if c]
  for i in range(num_clips):
    clip = toy_world.generate_clip(seed + i, num_chunks)
    texts.extend(clip.texts)
    for k in caption_every:
      texts.extend(c for c in toy_world.caption_clip(clip, k, 0.3, seed + i) if c)
  return texts
