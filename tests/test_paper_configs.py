"""Paper-scale configs (experiments/csgo_3b.py, experiments/sports_8b.py): every variant
validates, has the Llama-3 tower shapes, and `jax.eval_shape` of the model init (nothing
allocated) gives the analytic parameter count."""

import dataclasses
import math

import flax.linen as nn
import jax
import pytest

import llama_fixtures
from experiments import csgo_3b, llama3_common, sports_8b
from tv2tv_jax import config as config_lib
from tv2tv_jax import sharding, train_step
from tv2tv_jax.model import TV2TV

# Published sizes of the checkpoints (Llama-3.2-3B ties lm_head to the embedding).
LLAMA_3_2_3B_PARAMS = 3_212_749_824
LLAMA_3_1_8B_PARAMS = 8_030_261_248


def tower_params(m: config_lib.ModelConfig) -> int:
  """One tower: per layer 2 norms, Q/K/V/O, SwiGLU's three matrices."""
  d, h, kv, dh, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  per_layer = 2 * d + d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f
  return m.num_layers * per_layer


def unet_params(m: config_lib.ModelConfig) -> int:
  """Both U-Nets of tv2tv_jax/video_unet.py, written out from the module definitions."""
  cu, e, p, d = m.unet_channels, m.time_embed_dim, m.patch_size, m.d_model
  h, w, c = m.latent_shape
  conv = lambda cin, cout: 9 * cin * cout + cout
  dense = lambda cin, cout: cin * cout + cout
  group_norm = 2 * cu
  time_embed = dense(e, cu) + dense(cu, cu)
  res_block = group_norm + conv(cu, cu) + dense(cu, cu) + group_norm + conv(cu, cu)
  down = (time_embed + conv(c, cu) + h * w * cu + m.unet_blocks * res_block
          + dense(p * p * cu, d))
  up = (time_embed + dense(d, p * p * cu) + conv(2 * cu, cu) + m.unet_blocks * res_block
        + group_norm + conv(cu, c))
  return down + up


def analytic_counts(m: config_lib.ModelConfig) -> dict[str, int]:
  counts = dict(embed=m.vocab_size * m.d_model, lm_head=m.d_model * m.vocab_size,
                text_tower=tower_params(m), video_tower=tower_params(m),
                norms=2 * m.d_model, unets=unet_params(m))
  counts["total"] = sum(counts.values())
  return counts


CASES = [(csgo_3b, "6s"), (csgo_3b, "64s"), (csgo_3b, "hires"), (csgo_3b, "6s,t2v"),
         (sports_8b, "default"), (sports_8b, "lowres"), (sports_8b, "12s"),
         (sports_8b, "default,think2v")]


@pytest.mark.parametrize("module,variant", CASES,
                         ids=[f"{m.__name__.split('.')[-1]}:{v}" for m, v in CASES])
def test_variants_validate(module, variant):
  cfg = module.get_config(variant)
  exp = config_lib.experiment_from_config_dict(cfg)
  tower = (llama3_common.LLAMA_3_2_3B if module is csgo_3b else llama3_common.LLAMA_3_1_8B)
  for key, value in tower.items():
    assert getattr(exp.model, key) == value, key
  # Initialisation is opt-in from the command line (module docstrings).
  assert cfg.init.llama_dir == "" and cfg.init.video_tower_from_llama is False
  assert "ignore_rope_scaling" not in cfg.init  # the llama3 RoPE scaling is implemented
  assert exp.model.rope_type == "llama3" and exp.model.rope_scaling is not None
  ids = {r: tid for r, (_, tid) in llama3_common.LLAMA3_1_SPECIAL_IDS.items()}
  assert (exp.seq.pad_id, exp.seq.bof_id, exp.seq.eof_id, exp.seq.eos_id) == (
      ids["pad"], ids["bof"], ids["eof"], ids["eos"])
  if "," in variant:
    assert exp.seq.layout == variant.split(",")[1]
  # The mesh section resolves on a 256-chip slice: FSDP over all of it.
  mesh = sharding.mesh_config(cfg.get("mesh"))
  assert sharding.resolve_mesh_shape(mesh, 256) == (1, 256, 1, 1)
  assert sharding.rules_from_config(cfg)


@pytest.mark.parametrize("module,variant,row_len", [
    (csgo_3b, "6s", 512 + 2 * 25 * 120), (csgo_3b, "64s", 4096 + 2 * 257 * 120),
    (csgo_3b, "hires", 512 + 2 * 25 * 480), (sports_8b, "default", 512 + 2 * 25 * 448),
    (sports_8b, "lowres", 512 + 2 * 25 * 112), (sports_8b, "12s", 1024 + 2 * 49 * 112)])
def test_row_lengths_documented(module, variant, row_len):
  exp = config_lib.experiment_from_config_dict(module.get_config(variant))
  assert exp.row_len == row_len


def test_unknown_variant_named():
  with pytest.raises(ValueError, match="unknown config variant '7s'"):
    csgo_3b.get_config("7s")


@pytest.mark.parametrize("module,variant,llama_params", [
    (csgo_3b, "6s", LLAMA_3_2_3B_PARAMS), (sports_8b, "default", LLAMA_3_1_8B_PARAMS)],
    ids=["csgo_3b", "sports_8b"])
def test_param_count_from_eval_shape(module, variant, llama_params):
  exp = config_lib.experiment_from_config_dict(module.get_config(variant))
  # The attention implementation does not change the params; the XLA path traces quickly.
  exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, attention_impl="xla"))
  abstract = jax.eval_shape(lambda r: train_step.init_params(TV2TV(exp.model), exp, r),
                            jax.random.key(0))
  leaves = jax.tree.leaves(nn.unbox(abstract))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  got = sum(math.prod(x.shape) for x in leaves)
  want = analytic_counts(exp.model)
  print(f"{module.__name__}:{variant} params: eval_shape {got:,}; analytic {want}")
  assert got == want["total"]
  # Our text path (embedding, text tower, final norm, lm_head) is Llama's, with the head
  # untied: Llama-3.2-3B counts its tied head once.
  text_path = want["embed"] + want["text_tower"] + exp.model.d_model + want["lm_head"]
  tied_extra = want["lm_head"] if module is csgo_3b else 0
  assert text_path == llama_params + tied_extra
  # Stacked layers: one leading [num_layers] axis on every tower param.
  stack = nn.unbox(abstract)["stack"]["layers"]
  assert stack["text"]["qkv"]["wq"].shape == (exp.model.num_layers, exp.model.d_model,
                                              exp.model.num_heads, exp.model.head_dim)


def test_special_ids_checked_against_tokenizer(tmp_path):
  cfg = csgo_3b.get_config("6s")
  llama_fixtures.write_llama3_like_tokenizer(tmp_path / "tokenizer.json", reserved_2_id=128005)
  cfg.init.llama_dir = str(tmp_path)  # tokenizer.json is looked up beside the weights
  tok = llama3_common.check_tokenizer(cfg)
  assert tok.vocab_size == 128256 and tok.special_ids["pad"] == 128005
  # A Llama-3.0 tokenizer puts reserved_special_token_2 at 128004: the pad id is named.
  llama_fixtures.write_llama3_like_tokenizer(tmp_path / "llama30.json", reserved_2_id=128004)
  cfg.data.tokenizer_path = str(tmp_path / "llama30.json")
  with pytest.raises(config_lib.ConfigError, match="seq.pad_id"):
    llama3_common.check_tokenizer(cfg)
