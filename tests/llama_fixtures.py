"""Test stand-ins for Llama-3 files."""


def write_llama3_like_tokenizer(path, reserved_2_id: int = 128005) -> None:
  """A byte-level stand-in with Llama-3's 128256 ids and special-token names at their
  Llama-3.1/3.2 ids (reserved_2 at 128005) or Llama-3.0 ids (reserved_2 at 128004).

  Like Llama-3's own tokenizer it encodes any text (bytes, no merges: one token per byte),
  so captions and action texts of any source pass through it.
  """
  import tokenizers  # an install requirement: a missing one must fail, not skip
  from tokenizers import decoders, models, pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {ch: i for i, ch in enumerate(alphabet)}
  vocab.update({f"<|filler_{i}|>": i for i in range(len(alphabet), 128000)})
  names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
           "<|reserved_special_token_1|>"]
  names += (["<|finetune_right_pad_id|>", "<|reserved_special_token_2|>"]
            if reserved_2_id == 128005 else ["<|reserved_special_token_2|>", "<|other|>"])
  names += [f"<|special_filler_{i}|>" for i in range(256 - len(names))]
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # Special tokens take the next ids in order: 128000, 128001, ...
  tok.add_special_tokens([tokenizers.AddedToken(n, special=True) for n in names])
  tok.save(str(path))
