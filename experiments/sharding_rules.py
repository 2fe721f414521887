"""Logical-axis -> mesh-axis rules shared by the experiment configs.

Mesh axes: data (pure DP), fsdp (DP with params/optimizer sharded), tensor (heads,
FFN, vocab), sequence (room for sequence parallelism; unused by default). A config
copies these into `config.sharding_rules` and may edit them; the model code never
changes with the sharding. Logical names: `tv2tv_jax/axes.py`.
"""


def fsdp_tensor_rules() -> list:
  return [
      # --- activations -------------------------------------------------------
      ["activation_batch", ["data", "fsdp"]],  # the global batch over all DP axes
      ["activation_length", None],  # "sequence" here turns on sequence parallelism
      ["activation_embed", None],
      ["activation_heads", "tensor"],
      ["activation_kv_heads", "tensor"],
      ["activation_mlp", "tensor"],
      ["activation_vocab", "tensor"],
      # --- transformer parameters: FSDP over the width, TP over heads/FFN/vocab --
      ["layers", None],  # the scanned layer axis stays whole on every device
      ["embed", "fsdp"],
      ["vocab", "tensor"],
      ["q_heads", "tensor"],
      ["kv_heads", "tensor"],
      ["head_dim", None],
      ["mlp", "tensor"],
      ["norm", None],
      # --- the U-Nets around the video tower are small: replicated -----------------
      ["conv_in", None],
      ["conv_out", None],
      ["conv_height", None],
      ["conv_width", None],
      ["patch", None],
  ]
