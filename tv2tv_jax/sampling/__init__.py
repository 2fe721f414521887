"""KV-cached TV2TV sampling (docs/design.md, section 6; docs/sampling.md).

  kv_cache        the cache and the cached forward of a few tokens against it
  decoding        Request / SamplerConfig, their validation, the next-token rule, noise
  sampler         the (batched) generation loop and `sample` (the entry point)
  cached_backend  `CachedBackend`: the loop's calls as writes to and queries of one KV cache
  window          `SlidingWindow`: a one-row cached backend that drops the oldest chunks when full
  plan_free       `PlanFreeBackend`: the CFG branch from a second cache with no plan
  recompute       the from-scratch oracle backend (training forward at every step)
"""

from tv2tv_jax.sampling.decoding import Request, RequestError, SamplerConfig
from tv2tv_jax.sampling.sampler import (CacheFullError, CachedBackend, Generation, generate,
                                        generate_batch, sample)

__all__ = ["CacheFullError", "CachedBackend", "Generation", "Request", "RequestError",
           "SamplerConfig", "generate", "generate_batch", "sample"]
