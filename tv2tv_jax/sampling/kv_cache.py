"""The sampler's KV cache, and the model's forward on a few new slots against it.

One cache serves both towers: per layer, keys and values of every *cached* slot
(text tokens and clean chunk tokens, whichever tower produced them), plus the
per-slot metadata the mask rule reads (`masks.SeqMeta` of [B, C]) and a length
per row. Noisy chunk tokens are never written: they are queries only, and each
flow step recomputes them (docs/design.md, section 6).

Shapes (B rows, C capacity, Lyr layers, Hkv kv heads, dh head dim):

  k, v      [Lyr, B, C, Hkv, dh]  in the model's activation dtype; RoPE applied to k
  meta      SeqMeta of [B, C]     unused slots: segment 0 (padding), so the mask
                                  rule hides them from every real query
  length    i32[B]                slots in use per row (filled from slot 0)

There is no second forward pass here. New slots go through the model's own layers
(`model.MoTStack`, the same `nn.scan` and the same `attention.attend` dispatch as
training) with the cache passed in: each layer attends from the new slots to
[its cached keys | their own] under the plan `attention.prepare(q_meta, impl,
cached=cache.meta)` builds once per forward (`masks.against_cache` decides the key
set and slot ids), and returns the new slots' keys and values, which `write` appends.
Everything here is pure: a cache goes in, a new cache comes out.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tv2tv_jax import flow, masks
from tv2tv_jax.config import ModelConfig

TOWERS = ("text", "video")


@flax.struct.dataclass
class KVCache:
  """Keys/values of cached slots for every layer, with their mask metadata.

  k, v: [Lyr, B, C, Hkv, dh]; meta: SeqMeta of [B, C]; length: i32[B].
  """
  k: jax.Array
  v: jax.Array
  meta: masks.SeqMeta
  length: jax.Array

  @property
  def capacity(self) -> int:
    return int(self.k.shape[2])

  @property
  def batch(self) -> int:
    return int(self.k.shape[1])

  def tile(self, reps: int) -> "KVCache":
    """The cache repeated `reps` times along the batch (row b -> rows b·reps .. b·reps+reps-1).

    Used for the classifier-free-guidance pass: the conditional and unconditional
    branches attend to the same cache and differ only in their queries' drop flag.
    """
    rep = lambda a, axis: jnp.repeat(a, reps, axis=axis)
    return KVCache(k=rep(self.k, 1), v=rep(self.v, 1),
                   meta=jax.tree.map(lambda a: rep(a, 0), self.meta),
                   length=rep(self.length, 0))


def empty_meta(batch: int, length: int) -> masks.SeqMeta:
  """All-padding metadata of [batch, length] (segment 0, modality PAD)."""
  zeros = jnp.zeros((batch, length), jnp.int32)
  return masks.SeqMeta(segment_ids=zeros, modality=zeros, chunk_ids=zeros, positions=zeros,
                       order=zeros, plan_ids=zeros, cfg_drop=jnp.zeros((batch, length), bool))


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> KVCache:
  """An empty cache of `capacity` slots per row (zeros, all slots padding)."""
  if capacity < 1:
    raise ValueError(f"capacity must be positive, got {capacity}")
  shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
  dt = jnp.dtype(cfg.dtype)
  return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                 meta=empty_meta(batch, capacity), length=jnp.zeros((batch,), jnp.int32))


def layers_on_new_slots(m, cache: KVCache, x: jax.Array, tower: str,
                        q_meta: masks.SeqMeta):
  """Inside `model.apply`: the model's layers on Lq new slots of one tower, against `cache`.

  m: the bound TV2TV module; cache: KVCache with the same batch B as x;
  x: [B, Lq, D] the slots' embeddings (text embeddings or downsampled chunk tokens);
  tower: 'text' or 'video' (whose parameters they use in every layer); q_meta: SeqMeta
  of [B, Lq]. Returns (x_out [B, Lq, D] after the last layer, k_new, v_new
  [Lyr, B, Lq, Hkv, dh]); the cache itself is not modified (see `write`).
  """
  if tower not in TOWERS:
    raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
  x = x.astype(cache.k.dtype)
  empty = jnp.zeros((x.shape[0], 0, x.shape[2]), x.dtype)
  x_txt, x_vid = (x, empty) if tower == "text" else (empty, x)
  x_txt, x_vid, (k_new, v_new) = m.stack(x_txt, x_vid, q_meta, (cache.k, cache.v), cache.meta)
  return (x_txt if tower == "text" else x_vid), k_new, v_new


def write(cache: KVCache, k_new: jax.Array, v_new: jax.Array, q_meta: masks.SeqMeta,
          count: jax.Array | None = None) -> KVCache:
  """Appends the first count[b] of Lq new slots of each row b at that row's `length`.

  k_new/v_new: [Lyr, B, Lq, Hkv, dh]; q_meta: SeqMeta of [B, Lq]; count: i32[B]
  (default Lq for every row). Rows of a batched write hold different numbers of
  tokens (the rest is padding, or a row that writes nothing: count 0); slots past
  count[b] are not written, so a row's cache never holds padding in its used part.
  The caller checks capacity first: a slot beyond the capacity is dropped, not clamped.
  """
  b, lq = q_meta.segment_ids.shape
  cap = cache.capacity
  count = jnp.full((b,), lq, jnp.int32) if count is None else jnp.asarray(count, jnp.int32)
  j = jnp.arange(lq, dtype=jnp.int32)[None]
  # Out-of-range slot ids are dropped by the scatter, which is how padding is skipped.
  slot = jnp.where(j < count[:, None], cache.length[:, None] + j, cap)
  row = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, lq))
  put = lambda buf, new: buf.at[:, row, slot].set(new.astype(buf.dtype), mode="drop")
  meta = jax.tree.map(lambda buf, new: buf.at[row, slot].set(new.astype(buf.dtype),
                                                              mode="drop"),
                      cache.meta, q_meta)
  return KVCache(k=put(cache.k, k_new), v=put(cache.v, v_new), meta=meta,
                 length=cache.length + count)


# ----------------------------------------------------------------------------------
# Model-level steps (jit these; `model` is a TV2TV module, static).


def append_text(model, params, cache: KVCache, tokens: jax.Array, q_meta: masks.SeqMeta,
                count: jax.Array | None = None):
  """Appends text tokens i32[B, N] (metadata q_meta [B, N]; the first count[b] of row b
  are real, see `write`) in one forward pass.

  Returns (new cache, logits f32[B, N, vocab] of the appended tokens).
  """
  def forward(m):
    x, k_new, v_new = layers_on_new_slots(m, cache, m.embed(tokens), "text", q_meta)
    return m.text_logits(x), k_new, v_new

  logits, k_new, v_new = model.apply({"params": params}, method=forward)
  return write(cache, k_new, v_new, q_meta, count), logits


def append_clean(model, params, cache: KVCache, latent: jax.Array, q_meta: masks.SeqMeta,
                 count: jax.Array | None = None):
  """Appends one clean chunk f32[B, h, w, c] per row (flow time 1; q_meta [B, n];
  count i32[B]: n, or 0 for a row that writes nothing) in one pass."""
  b = latent.shape[0]

  def forward(m):
    tokens, _ = m.encode_chunks(latent[:, None], jnp.ones((b, 1), jnp.float32))
    return layers_on_new_slots(m, cache, tokens, "video", q_meta)[1:]

  k_new, v_new = model.apply({"params": params}, method=forward)
  return write(cache, k_new, v_new, q_meta, count)


def _tiled(cache: KVCache, rows: int) -> KVCache:
  reps = rows // cache.batch
  if reps * cache.batch != rows:
    raise ValueError(f"query batch {rows} is not a multiple of the cache batch {cache.batch}")
  return cache.tile(reps) if reps > 1 else cache


def _encode(model, params, x_t: jax.Array, t: jax.Array):
  """U-Net downsampler of one noisy chunk per row: x_t f32[B, h, w, c], t f32[B] ->
  (tokens [B, n, D], skip [B, h, w, C_u])."""
  return model.apply({"params": params}, x_t[:, None], t[:, None],
                     method=lambda m, l, tt: m.encode_chunks(l, tt))


def _velocity_from_tokens(model, params, cache: KVCache, tokens: jax.Array, skip: jax.Array,
                          t: jax.Array, q_meta: masks.SeqMeta) -> jax.Array:
  """The rest of a noisy velocity, against a cache already tiled to the query batch."""
  def forward(m):
    x, _, _ = layers_on_new_slots(m, cache, tokens, "video", q_meta)
    return m.chunk_velocity(x, skip, t[:, None])

  return model.apply({"params": params}, method=forward)[:, 0]


def noisy_velocity(model, params, cache: KVCache, x_t: jax.Array, t: jax.Array,
                   q_meta: masks.SeqMeta) -> jax.Array:
  """Velocity of one noisy chunk per row against the cache; nothing is written.

  x_t: f32[Bq, h, w, c], t: f32[Bq], q_meta: SeqMeta of [Bq, n] where Bq = r·B
  (rows b·r .. b·r + r - 1 all use cache row b, e.g. r = 2 for the batched CFG
  pass whose rows differ only in `q_meta.cfg_drop`). Returns f32[Bq, h, w, c].
  """
  tokens, skip = _encode(model, params, x_t, t)
  return _velocity_from_tokens(model, params, _tiled(cache, x_t.shape[0]), tokens, skip, t,
                               q_meta)


def denoise(model, params, cache: KVCache, x0: jax.Array, grid: jax.Array,
            q_meta: masks.SeqMeta, cfg_scale: jax.Array, solver: str) -> jax.Array:
  """Integrates one noisy chunk per row from t = grid[0] to grid[-1]; nothing is written.

  x0: f32[B, h, w, c] the chunks' noise; grid: f32[m + 1] (`flow.time_grid`);
  q_meta: SeqMeta of [r·B, n] as in `noisy_velocity` (r = 2: CFG, row b·2 + 1 with
  the plan dropped); cfg_scale: f32[]; solver: 'euler' | 'heun' (static).
  Returns f32[B, h, w, c]. The m steps run in one `fori_loop`, so a chunk is one
  dispatch; the cache is tiled for CFG once, outside the loop, and the two CFG
  branches share one downsampler pass (same x_t, same t).
  """
  b = x0.shape[0]
  reps = q_meta.segment_ids.shape[0] // b
  cache = _tiled(cache, reps * b)

  def guided(x, t):
    # Both CFG branches denoise the same x_t at the same t: downsample it once.
    tokens, skip = _encode(model, params, x, jnp.full((b,), t, jnp.float32))
    rep = lambda a: jnp.repeat(a, reps, axis=0)
    v = _velocity_from_tokens(model, params, cache, rep(tokens), rep(skip),
                              jnp.full((reps * b,), t, jnp.float32), q_meta)
    v = v.reshape(b, reps, *v.shape[1:])
    return flow.guided_velocity(jnp.moveaxis(v, 1, 0), cfg_scale)

  step = lambda i, x: flow.ode_step(guided, x, grid[i], grid[i + 1], solver)
  return jax.lax.fori_loop(0, grid.shape[0] - 1, step, x0.astype(jnp.float32))
