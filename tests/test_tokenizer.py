"""The text tokenizer: special tokens, round trips, unknown characters, configs, Llama-3 layout."""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import pre_tokenizers

from data_pipelines import tokenizer as tok_lib
from data_pipelines import toy_world
from tv2tv_jax.config import ConfigError


@pytest.fixture(scope="module")
def corpus():
  return tok_lib.toy_world_corpus(num_clips=8, num_chunks=12)


@pytest.fixture(scope="module")
def char_tok(corpus):
  return tok_lib.train_bpe(corpus, vocab_size=128, byte_level=False)


@pytest.fixture(scope="module")
def byte_tok(corpus):
  return tok_lib.train_bpe(corpus, vocab_size=400, byte_level=True)


def _llama3_like_json(path):
  """A tokenizer.json laid out like Llama-3.1's: 128000 BPE ids, then 256 special tokens.

  The BPE part is byte-level with a few real merges ("left", " fire") and dummy entries to
  fill 128000 ids; the added tokens carry Llama-3.1's names and ids, and the post-processor
  prepends <|begin_of_text|> as the real one does.
  """
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {ch: i for i, ch in enumerate(alphabet)}
  merges = [("l", "e"), ("le", "f"), ("lef", "t"), ("\u0120", "f"), ("\u0120f", "i"),
            ("\u0120fi", "r"), ("\u0120fir", "e")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  while len(vocab) < 128000:
    vocab[f"dummy{len(vocab)}"] = len(vocab)
  names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
           "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
  names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(names))]
  added = [dict(id=128000 + i, content=n, single_word=False, lstrip=False, rstrip=False,
                normalized=False, special=True) for i, n in enumerate(names)]
  spec = {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
      "normalizer": None,
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split",
           "pattern": {"Regex": r"\s?\p{L}+|\s?\p{N}{1,3}|\s?[^\s\p{L}\p{N}]+|\s+"},
           "behavior": "Isolated", "invert": False},
          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
           "use_regex": False}]},
      "post_processor": {"type": "TemplateProcessing",
                         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}}],
                         "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                         "special_tokens": {"<|begin_of_text|>": {
                             "id": "<|begin_of_text|>", "ids": [128000],
                             "tokens": ["<|begin_of_text|>"]}}},
      "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                  "use_regex": True},
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": None, "end_of_word_suffix": None,
                "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                "vocab": vocab, "merges": [list(m) for m in merges]},
  }
  path.write_text(json.dumps(spec))
  return path


def test_special_ids_are_the_sequence_defaults(char_tok, byte_tok):
  for tok in (char_tok, byte_tok):
    assert tok.special_ids == {"pad": 0, "bof": 1, "eof": 2, "eos": 3}
    assert [tok.tokenizer.id_to_token(i) for i in range(4)] == [
        tok_lib.PAD, tok_lib.BOF, tok_lib.EOF, tok_lib.EOS]
  assert char_tok.vocab_size <= 128 and not char_tok.byte_level
  assert byte_tok.vocab_size <= 400 and byte_tok.byte_level


def test_toy_world_texts_round_trip_without_specials(char_tok, byte_tok, corpus):
  clip = toy_world.generate_clip(1234, 16)
  texts = clip.texts + toy_world.caption_clip(clip, 4, 0.5, 7) + corpus[:50]
  for tok in (char_tok, byte_tok):
    for text in texts:
      ids = tok.encode(text)
      assert ids.dtype == np.int32 and ids.ndim == 1
      assert not set(ids.tolist()) & set(tok.special_ids.values()), text
      assert tok.decode(ids) == text
    assert tok.encode("").shape == (0,)
  # BPE merged frequent words: a whole action text is a few tokens, not one per character.
  assert len(char_tok.encode("left fire")) <= 3


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_byte_level_encodes_any_text_exactly(byte_tok, text):
  ids = byte_tok.encode(text)
  assert not set(ids.tolist()) & set(byte_tok.special_ids.values())
  assert byte_tok.decode(ids) == text


def test_special_token_strings_in_text_are_text(byte_tok):
  text = f"left {tok_lib.BOF} up{tok_lib.EOS}"
  ids = byte_tok.encode(text)
  assert byte_tok.bof_id not in ids.tolist() and byte_tok.eos_id not in ids.tolist()
  assert byte_tok.decode(ids) == text


def test_char_level_unknown_character_raises_naming_text(char_tok):
  with pytest.raises(tok_lib.UnknownCharacterError, match=r"'left \?'.*'\?'"):
    char_tok.encode("left ?")
  with pytest.raises(tok_lib.UnknownCharacterError, match="U\\+00E9"):
    char_tok.encode("\u00e9")
  # The Metaspace marker itself is not a text character either.
  with pytest.raises(tok_lib.UnknownCharacterError):
    char_tok.encode("left\u2581fire")
  # Spaces in any arrangement are known.
  assert char_tok.decode(char_tok.encode("  left  fire ")) == "  left  fire "


def test_decode_specials_and_range(char_tok):
  ids = np.concatenate([[char_tok.bof_id], char_tok.encode("up"), [char_tok.eof_id]])
  assert char_tok.decode(ids) == "up"
  assert char_tok.decode(ids, skip_special_tokens=False) == f"{tok_lib.BOF}up{tok_lib.EOF}"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    char_tok.decode([char_tok.vocab_size])


def test_save_load_round_trip(char_tok, byte_tok, tmp_path):
  for name, tok in (("char", char_tok), ("byte", byte_tok)):
    path = tmp_path / f"{name}.json"
    tok.save(path)
    loaded = tok_lib.load_tokenizer(path)
    assert loaded.special_ids == tok.special_ids
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.byte_level == tok.byte_level
    for text in ("left fire", "moved up three times then fired", "stop"):
      np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))
  with pytest.raises(tok_lib.UnknownCharacterError):
    tok_lib.load_tokenizer(tmp_path / "char.json").encode("x!")


def test_training_is_deterministic(corpus):
  a = tok_lib.train_bpe(corpus, vocab_size=100, byte_level=False)
  b = tok_lib.train_bpe(corpus, vocab_size=100, byte_level=False)
  assert a.tokenizer.to_str() == b.tokenizer.to_str()


def test_vocab_too_small_is_a_clear_error(corpus):
  with pytest.raises(ValueError, match="byte_level=False"):
    tok_lib.train_bpe(corpus, vocab_size=200, byte_level=True)
  with pytest.raises(ValueError, match="symbols"):
    tok_lib.train_bpe(corpus, vocab_size=8, byte_level=False)


def test_config_overrides_make_a_compatible_experiment(char_tok, tiny_exp):
  over = char_tok.config_overrides()
  assert over == {"seq": {"pad_id": 0, "bof_id": 1, "eof_id": 2, "eos_id": 3},
                  "model": {"vocab_size": char_tok.vocab_size}}
  assert tok_lib.config_overrides(char_tok, vocab_multiple=64)["model"]["vocab_size"] % 64 == 0
  exp = dataclasses.replace(tiny_exp, seq=dataclasses.replace(tiny_exp.seq, **over["seq"]),
                            model=dataclasses.replace(tiny_exp.model, **over["model"]))
  tok_lib.check_compatible(char_tok, exp)  # no error
  tok_lib.check_compatible(char_tok, tiny_exp)  # tiny: vocab 128 >= tokenizer, ids 0..3


@pytest.mark.parametrize("field,value", [("bof_id", 5), ("eos_id", 1), ("pad_id", 3)])
def test_check_compatible_names_the_special_field(char_tok, tiny_exp, field, value):
  exp = dataclasses.replace(tiny_exp, seq=dataclasses.replace(tiny_exp.seq, **{field: value}))
  with pytest.raises(ConfigError, match=rf"seq\.{field}") as err:
    tok_lib.check_compatible(char_tok, exp)
  assert err.value.field == f"seq.{field}"


def test_check_compatible_names_vocab_size(byte_tok, tiny_exp):
  with pytest.raises(ConfigError, match=r"model\.vocab_size.*128") as err:
    tok_lib.check_compatible(byte_tok, tiny_exp)  # byte-level needs > 128 ids
  assert err.value.field == "model.vocab_size"


def test_llama3_tokenizer_json(tmp_path, byte_tok):
  tok = tok_lib.load_tokenizer(_llama3_like_json(tmp_path / "tokenizer.json"))
  assert tok.vocab_size == 128256 and tok.byte_level
  assert tok.special_ids == {"pad": 128005, "bof": 128002, "eof": 128003, "eos": 128001}
  assert tok.specials == tok_lib.LLAMA3_SPECIALS
  ids = tok.encode("left fire")
  # No <|begin_of_text|> although the post-processor would add it; merges were applied.
  assert ids.tolist() == [tok.tokenizer.token_to_id("left"),
                          tok.tokenizer.token_to_id("\u0120fire")]
  assert tok.decode(ids) == "left fire"
  text = "up <|reserved_special_token_0|> \u00e9\U0001F642"
  assert tok.decode(tok.encode(text)) == text and tok.bof_id not in tok.encode(text)
  assert tok.config_overrides() == {
      "seq": {"pad_id": 128005, "bof_id": 128002, "eof_id": 128003, "eos_id": 128001},
      "model": {"vocab_size": 128256}}
  # An explicit role map is honoured; one naming an absent token is a clear error.
  custom = dict(tok_lib.LLAMA3_SPECIALS, pad="<|finetune_right_pad_id|>")
  assert tok_lib.load_tokenizer(tmp_path / "tokenizer.json", custom).pad_id == 128004
  with pytest.raises(tok_lib.SpecialTokenError, match="<\\|nope\\|>"):
    tok_lib.load_tokenizer(tmp_path / "tokenizer.json", dict(custom, eos="<|nope|>"))


def test_unknown_tokenizer_without_specials_is_a_clear_error(tmp_path):
  from tokenizers import Tokenizer, models
  Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "t.json"))
  with pytest.raises(tok_lib.SpecialTokenError, match="pass specials"):
    tok_lib.load_tokenizer(tmp_path / "t.json")


def test_encoded_toy_texts_lay_out_in_the_sequence(char_tok, tiny_exp):
  """Token ids from the tokenizer are accepted by the layout (in vocab, no specials)."""
  from tv2tv_jax import sequence
  clip = toy_world.generate_clip(5, tiny_exp.seq.max_chunks - 1)
  latents = np.zeros((clip.num_chunks + 1, *tiny_exp.model.latent_shape), np.float32)
  ex = sequence.Example(prompt=char_tok.encode("stop"),
                        chunk_texts=[char_tok.encode(t) for t in clip.texts],
                        latents=latents, first_frame=True, name="clip5")
  laid = sequence.layout_example(ex, tiny_exp.seq, tiny_exp.model)
  text = laid.text_tokens.tolist()
  assert text.count(char_tok.bof_id) == clip.num_chunks and text[-1] == char_tok.eos_id
  words = char_tok.decode(laid.text_tokens)  # specials skipped, chunk texts concatenated
  assert words == "stop" + "".join(clip.texts)


@pytest.mark.parametrize("content,what", [
    (b'{"version": "1.0", "model": {"type": "BPE", "vocab"', "not valid UTF-8 JSON"),
    (b"\xff\xfe binary", "not valid UTF-8 JSON"),
    (b"", "not valid UTF-8 JSON"),
    (b'{"a": 1}', "JSON, but not a Hugging Face tokenizer.json"),
    (b"[1, 2]", "JSON, but not a Hugging Face tokenizer.json"),
])
def test_corrupt_tokenizer_json_names_the_file(tmp_path, content, what):
  """A truncated, binary or wrong-schema tokenizer.json is an error naming the file (the
  `tokenizers` message alone names neither file nor problem kind); the cause is kept."""
  path = tmp_path / "tokenizer.json"
  path.write_bytes(content)
  with pytest.raises(tok_lib.TokenizerFileError) as err:
    tok_lib.load_tokenizer(path)
  assert str(err.value).startswith(f"{path}: {what}")
  assert err.value.__cause__ is not None
