"""The TV2TV Mixture-of-Transformers (Flax Linen, pure functional).

Two towers of identical shape, one for text and one for video. Every
non-embedding parameter is per modality (both RMSNorms, Q/K/V, output projection,
FFN); attention is one global self-attention over the whole packed row under the
TV2TV mask.

Routing. A row is stored grouped by modality (`tv2tv_jax.sequence`):
``[T text | K·n noisy | K·n clean]``. The residual stream is carried as two
arrays, text [B, T, D] and video [B, 2Kn, D]; each tower's matmuls run on its own
array only, and only Q/K/V are concatenated for the shared attention. No token is
ever processed by both towers, and nothing is gathered or scattered per layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tv2tv_jax import attention, axes, layers, masks
from tv2tv_jax.config import ModelConfig
from tv2tv_jax.video_unet import VideoDownsampler, VideoUpsampler


class MoTLayer(nn.Module):
  """One Mixture-of-Transformers layer, for training and for decoding alike.

  carry: (x_text [B, T, D], x_video [B, V, D]); meta: SeqMeta of [B, T + V];
  plan: `attention.prepare(meta, cfg.attention_impl[, cached=... | regions=...])`, shared
    by every layer.
  cached_kv: None (the row attends to itself), or this layer's KV cache (k, v), each
    [B, C, Hkv, dh]: the new slots then attend to [cache | themselves] (decoding; either
    tower's array may be empty, [B, 0, D]).
  Returns (the updated carry, None) without a cache, (carry, (k, v) [B, T + V, Hkv, dh]
  of the new slots, RoPE applied, to be written into the cache) with one; nn.scan
  stacks the second over layers.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, meta: masks.SeqMeta, plan=None, cached_kv=None):
    x_txt, x_vid = carry
    c = self.cfg
    text, video = layers.TowerLayer(c, name="text"), layers.TowerLayer(c, name="video")
    q_t, k_t, v_t = text.project(x_txt)
    q_v, k_v, v_v = video.project(x_vid)
    q = layers.apply_rope(jnp.concatenate([q_t, q_v], axis=1), meta.positions, c.rope_theta,
                          c.rope_scaling)
    k = layers.apply_rope(jnp.concatenate([k_t, k_v], axis=1), meta.positions, c.rope_theta,
                          c.rope_scaling)
    v = jnp.concatenate([v_t, v_v], axis=1)
    keys, values = k, v
    if cached_kv is not None:
      keys, values = (jnp.concatenate([cached, new.astype(cached.dtype)], axis=1)
                      for cached, new in zip(cached_kv, (k, v)))
    o = attention.attend(q, keys, values, meta, impl=c.attention_impl, plan=plan)
    n_txt = x_txt.shape[1]
    x_txt = text.finish(x_txt, o[:, :n_txt])
    x_vid = video.finish(x_vid, o[:, n_txt:])
    x_txt = nn.with_logical_constraint(x_txt, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    x_vid = nn.with_logical_constraint(x_vid, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    return (x_txt, x_vid), (None if cached_kv is None else (k, v))


class MoTStack(nn.Module):
  """`num_layers` MoT layers, scanned (stacked params on a leading `layers` axis) or unrolled.

  The attention plan (the kernel's block tables, the 'xla' region sizes, or against a
  cache the decode mask) depends on the metadata and shapes only: built here once per
  forward and broadcast to every layer, not rebuilt in each.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_txt, x_vid, meta, cached_kv=None, cached_meta=None, regions=None):
    """x_txt [B, T, D], x_vid [B, V, D], meta SeqMeta of [B, T + V].

    Decoding passes the KV cache: cached_kv (k, v), each [Lyr, B, C, Hkv, dh], and
    cached_meta SeqMeta of [B, C]; the layers then run on the T + V new slots only.
    regions: without a cache, the rows' storage layout (`masks.Regions`), with which
      'xla' attention skips the key blocks the layout makes invisible; None: dense.
    Returns (x_txt, x_vid), plus with a cache the new slots' (k, v), each
    [Lyr, B, T + V, Hkv, dh].
    """
    c = self.cfg
    if (cached_kv is None) != (cached_meta is None):
      raise ValueError("decoding needs both cached_kv and cached_meta")
    plan = attention.prepare(meta, c.attention_impl, cached=cached_meta, regions=regions)
    layer_cls = nn.remat(MoTLayer, prevent_cse=not c.scan_layers) if c.remat else MoTLayer
    if c.scan_layers:
      # The cache is scanned over its leading layer axis, as the params are. A decode
      # step is a few slots per layer, so a loop iteration's overhead is a large part of
      # it: decoding unrolls the loop (same parameters, same program per layer).
      stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0), length=c.num_layers,
                      unroll=1 if cached_kv is None else c.num_layers,
                      metadata_params={nn.PARTITION_NAME: axes.LAYERS})(c, name="layers")
      (x_txt, x_vid), new_kv = stack((x_txt, x_vid), meta, plan, cached_kv)
    else:
      new = []
      for i in range(c.num_layers):
        layer_kv = None if cached_kv is None else jax.tree.map(lambda a, i=i: a[i], cached_kv)
        (x_txt, x_vid), kv = layer_cls(c, name=f"layer_{i}")((x_txt, x_vid), meta, plan,
                                                              layer_kv)
        new.append(kv)
      new_kv = None if cached_kv is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
    return (x_txt, x_vid) if cached_kv is None else (x_txt, x_vid, new_kv)


class TV2TV(nn.Module):
  """Text logits and noisy-chunk velocities for a packed batch.

  Call args:
    text_tokens: i32[B, T] token ids of the text slots.
    noisy_latents: f32[B, K, h, w, c] the x_t of each noisy copy.
    noisy_t: f32[B, K] flow time of each noisy copy (t = 1 is clean; `flow`).
    clean_latents: f32[B, K, h, w, c] each clean copy's latent (possibly flipped).
    clean_t: f32[B, K] its time (1 unless flipped).
    meta: SeqMeta of [B, T + 2·K·n].
  Attention is told the rows' storage regions (T, K·n noisy, n per copy; from these
  shapes), so 'xla' skips the key blocks no query can see (`reference.region_attention`).
  `attention_regions=False` runs the dense oracle instead (same result).
  Returns:
    logits: f32[B, T, vocab] for every text slot;
    velocity: f32[B, K, h, w, c] predicted velocity of every noisy copy.
  """
  cfg: ModelConfig
  attention_regions: bool = True

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.dtype(c.dtype),
                          param_dtype=jnp.dtype(c.param_dtype),
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(1.0), (axes.VOCAB, axes.EMBED)))
    self.down = VideoDownsampler(c)
    self.stack = MoTStack(c)
    self.text_norm = layers.RMSNorm(c)
    self.video_norm = layers.RMSNorm(c)
    self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=jnp.dtype(c.dtype),
                            param_dtype=jnp.dtype(c.param_dtype),
                            kernel_init=nn.with_logical_partitioning(
                                nn.initializers.normal(c.d_model ** -0.5),
                                (axes.EMBED, axes.VOCAB)))
    self.up = VideoUpsampler(c)

  def encode_chunks(self, latents: jax.Array, t: jax.Array):
    """latents f32[B, K, h, w, c], t f32[B, K] -> (tokens [B, K·n, D], skip [B·K, h, w, C_u])."""
    b, k = latents.shape[:2]
    tokens, skip = self.down(latents.reshape(b * k, *latents.shape[2:]), t.reshape(b * k))
    return tokens.reshape(b, k * tokens.shape[1], tokens.shape[2]), skip

  def text_logits(self, x_txt: jax.Array) -> jax.Array:
    """x_txt [B, T, D] (last layer) -> f32[B, T, vocab]."""
    logits = self.lm_head(self.text_norm(x_txt)).astype(jnp.float32)
    return nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))

  def chunk_velocity(self, x_noisy: jax.Array, skip: jax.Array, t: jax.Array) -> jax.Array:
    """x_noisy [B, K·n, D] (last layer), skip [B·K, h, w, C_u], t [B, K] -> f32[B, K, h, w, c]."""
    b, k = t.shape
    n = self.cfg.tokens_per_chunk
    tokens = self.video_norm(x_noisy).reshape(b * k, n, -1)
    vel = self.up(tokens, skip, t.reshape(b * k))
    return vel.reshape(b, k, *vel.shape[1:])

  def __call__(self, text_tokens, noisy_latents, noisy_t, clean_latents, clean_t,
               meta: masks.SeqMeta):
    k = noisy_latents.shape[1]
    x_txt = self.embed(text_tokens)
    # One downsampler pass over noisy and clean copies together (shared weights).
    tokens, skip = self.encode_chunks(jnp.concatenate([noisy_latents, clean_latents], axis=1),
                                      jnp.concatenate([noisy_t, clean_t], axis=1))
    b = tokens.shape[0]
    kc = clean_latents.shape[1]
    skip_noisy = skip.reshape(b, k + kc, *skip.shape[1:])[:, :k].reshape(b * k,
                                                                        *skip.shape[1:])
    x_txt = nn.with_logical_constraint(x_txt, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    x_vid = nn.with_logical_constraint(tokens.astype(x_txt.dtype),
                                       (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    n = self.cfg.tokens_per_chunk
    regions = (masks.Regions(text=text_tokens.shape[1], noisy=k * n, block=n)
               if self.attention_regions else None)
    x_txt, x_vid = self.stack(x_txt, x_vid, meta, regions=regions)
    n_noisy = k * n
    return self.text_logits(x_txt), self.chunk_velocity(x_vid[:, :n_noisy], skip_noisy, noisy_t)
