"""Logical axis names: the one place they are spelled.

Parameters carry these names through `nn.with_logical_partitioning`, activations
through `nn.with_logical_constraint`. Which mesh axis each name maps to is *not*
decided here: the experiment config holds the rules (a list of
`(logical_name, mesh_axis_or_None)` pairs), so the model code never changes when
the sharding does.
"""

# --- parameters -------------------------------------------------------------
LAYERS = "layers"  # the stacked (nn.scan) layer axis
VOCAB = "vocab"
EMBED = "embed"  # model width D
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"  # FFN hidden width
NORM = "norm"  # RMSNorm scale vectors
CONV_IN = "conv_in"  # U-Net conv input channels
CONV_OUT = "conv_out"  # U-Net conv output channels
CONV_HEIGHT = "conv_height"  # conv kernel taps / latent-grid rows
CONV_WIDTH = "conv_width"  # conv kernel taps / latent-grid columns
PATCH = "patch"  # flattened patch features (p*p*C)

# --- activations ------------------------------------------------------------
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"

PARAM_AXES = (LAYERS, VOCAB, EMBED, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, NORM,
              CONV_IN, CONV_OUT, CONV_HEIGHT, CONV_WIDTH, PATCH)
ACTIVATION_AXES = (BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP,
                   ACT_VOCAB)

# Replicate everything: the rules used when no mesh is configured (one device).
REPLICATED_RULES = tuple((name, None) for name in PARAM_AXES + ACTIVATION_AXES)
