"""Test stand-ins for Llama-3 files."""


def write_llama3_like_tokenizer(path, reserved_2_id: int = 128005) -> None:
  """A word-level stand-in with Llama-3's 128256 ids and special-token names at their
  Llama-3.1/3.2 ids (reserved_2 at 128005) or Llama-3.0 ids (reserved_2 at 128004)."""
  import tokenizers  # an install requirement: a missing one must fail, not skip
  vocab = {f"w{i}": i for i in range(128000)}
  names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
           "<|reserved_special_token_1|>"]
  names += (["<|finetune_right_pad_id|>", "<|reserved_special_token_2|>"]
            if reserved_2_id == 128005 else ["<|reserved_special_token_2|>", "<|other|>"])
  names += [f"<|filler_{i}|>" for i in range(256 - len(names))]
  vocab.update({name: 128000 + i for i, name in enumerate(names)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(path))
