"""KV-cached TV2TV sampling (docs/design.md, section 6; docs/sampling.md).

  kv_cache    the cache and the cached forward of a few tokens against it
  decoding    Request / SamplerConfig, their validation, the next-token rule, noise
  sampler     the (batched) generation loop, `CachedBackend`, `sample` (the entry point)
  recompute   the from-scratch oracle backend (training forward at every step)
"""

from tv2tv_jax.sampling.decoding import Request, RequestError, SamplerConfig
from tv2tv_jax.sampling.sampler import (CacheFullError, CachedBackend, Generation, generate,
                                        generate_batch, sample)

__all__ = ["CacheFullError", "CachedBackend", "Generation", "Request", "RequestError",
           "SamplerConfig", "generate", "generate_batch", "sample"]
