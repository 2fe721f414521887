"""A `CachedBackend` that records the attention mask of every pass (for the mask tests).

`CachedBackend._meta` builds each pass's query metadata once, just before the pass runs
against the cache as it then is; `RecordingBackend` computes row 0's mask there with
`attention.prepare(q_meta, 'xla', cached=...)` (the plan of every cached forward) and keeps it.
"""

from typing import Any

import numpy as np

from tv2tv_jax import attention, sequence
from tv2tv_jax.sampling.cached_backend import CachedBackend

_KIND = {sequence.TEXT: "text", sequence.NOISY: "noisy", sequence.CLEAN: "clean"}


class RecordingBackend(CachedBackend):
  """CachedBackend keeping, per pass, row 0's mask (and, for CFG, its dropped copy's).

  records: [{'kind': 'text' | 'clean' | 'noisy', 'drop': bool[r] (each query copy's CFG drop),
  'q_order': i64[Lq] (the queries' logical orders), 'k_order': i64[used + Lq] and
  'k_modality' i32[used] (the cached slots', then the queries'), 'mask': bool[r, Lq, used + Lq]
  (what each query sees of [used cache slots | the queries]), 'unused_visible': whether any
  query sees an unused cache slot}].
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.records: list[dict[str, Any]] = []

  def _meta(self, count, width, modality, chunk_id, at, plan, drops=(False,)):
    q_meta = super()._meta(count, width, modality, chunk_id, at, plan, drops)
    self._record(_KIND[modality], q_meta)
    return q_meta

  def _record(self, kind: str, q_meta) -> None:
    cache = self.cache
    reps = q_meta.segment_ids.shape[0] // cache.batch
    cache = cache.tile(reps) if reps > 1 else cache
    m = np.asarray(attention.prepare(q_meta, "xla", cached=cache.meta).mask)
    used = int(self.used[0])
    valid = np.asarray(q_meta.segment_ids[0]) > 0
    q_order = np.asarray(q_meta.order[0])[valid]
    self.records.append({
        "kind": kind, "drop": np.asarray(q_meta.cfg_drop[:reps, 0]),
        "q_order": q_order,
        "k_order": np.concatenate([np.asarray(cache.meta.order[0, :used]), q_order]),
        "k_modality": np.asarray(cache.meta.modality[0, :used]),
        "mask": np.concatenate([m[:reps, valid, :used],
                                m[:reps][:, valid][:, :, self.capacity:][:, :, valid]], axis=2),
        "unused_visible": bool(m[:reps, valid, used:self.capacity].any())})
