r"""Sweeps over the toy-world study: how dense, and how wrong, may TV2TV's text be?

Each sweep is a list of points, each point a name and overrides of the study config
(`experiments/toy_study.py`), trained and evaluated per seed exactly as the study trains
and evaluates an arm (`tv2tv_jax/sweep.py`). Both sweeps may share one work directory:
identical data stages, VAE and runs are then built once.

    python -m tv2tv_jax.sweep --config=experiments/toy_sweeps.py:density \
        --workdir=<sweep dir> --results=docs/results/sweep_density
    python -m tv2tv_jax.sweep --config=experiments/toy_sweeps.py:error \
        --workdir=<sweep dir> --results=docs/results/sweep_error

Variants (the part after the colon):
  density  TV2TV trained on the toy world's caption mode with a caption every 1, 2, 4, 8,
           16 chunks (placed before the chunks it describes), no wrong captions; T2V is
           the zero-density end (no text at all). x = captions per chunk, log axis.
  error    a caption every 8 chunks, 0, 10, 30 or 50% of them wrong (a well-formed
           summary of random actions). Its 0% point is the density sweep's every-8
           point: the same run when both share a work directory.
  smoke    two points at test size (tests/test_sweep.py): checks the plumbing.

Common to both: 16-chunk clips (so that one caption every 16 chunks plans the whole clip;
a caption may describe up to 16 chunks), otherwise the study's model, data sizes,
optimiser and evaluation (32 held-out clips, actions inserted at 1 s and 3 s: chunks 3
and 11, moved to the caption that plans them), 3 seeds per point.

Sizing: 600 training steps per run. A 16-chunk row (112 text slots, 16 noisy and 17
clean chunk copies) costs 1.45x the study's 12-chunk step in FLOPs (63 against 43
GFLOP). Measured on the 2-core CPU, alone on the machine: 344-469 s of training per run
with region attention and `rows_matmul` (724 s before them), 8-10 minutes with the
evaluation. The two sweeps hold 27 distinct runs (6 + 4 points x 3 seeds, one point
shared) and 8 distinct data directories (one VAE, about 12 minutes; tokenizer, TFDS and
latents a few minutes each).
"""

import ml_collections

from experiments import toy_study

# 16-chunk clips: the study's VAE works on any length (causal), rows grow to 16 noisy and
# 17 clean chunk copies. Text: the longest row of 2048 training clips needs 100 slots
# (every 8 chunks, half the captions wrong); every = 1 and 16 need 94 and 91.
_CLIP = dict(num_chunks=16, text_len=112, max_chunks=17, noisy_chunks=16)
_STEPS = 600


def _captions(c: ml_collections.ConfigDict, num_chunks: int, every: int,
              wrong: float) -> None:
  """The study's toy world (its split sizes) as sports captions; every field explicit,
  so each point's data stages are keyed on all of them."""
  c.data.toy_world = ml_collections.ConfigDict(dict(
      name="sweep", num_train=c.data.toy_world.num_train,
      num_validation=c.data.toy_world.num_validation, num_chunks=num_chunks,
      caption_mode="sports", caption_every=every, wrong_rate=wrong,
      caption_placement="plan"))


def _sweep_base(c: ml_collections.ConfigDict) -> None:
  _captions(c, _CLIP["num_chunks"], 1, 0.0)
  c.seq.update(text_len=_CLIP["text_len"], max_chunks=_CLIP["max_chunks"],
               noisy_chunks=_CLIP["noisy_chunks"])
  c.optim.update(total_steps=_STEPS)
  c.train.update(num_steps=_STEPS, save_every=200, eval_every=300)


def _point(name: str, x: float | None, arm: str = "tv2tv", **overrides) -> dict:
  """A sweep point: `overrides` maps dotted study-config fields to values."""
  return {"name": name, "x": x, "arm": arm, "overrides": dict(overrides)}


def _every(k: int, wrong: float = 0.0) -> dict:
  return {"data.toy_world.caption_every": k, "data.toy_world.wrong_rate": wrong}


def _density(c: ml_collections.ConfigDict) -> None:
  _sweep_base(c)
  points = [_point(f"every{k}", 1.0 / k, **_every(k)) for k in (1, 2, 4, 8, 16)]
  # T2V never reads chunk text, so it trains on the every-1 data (one data directory
  # fewer); x None: drawn as a reference line, not on the log axis.
  points.append(_point("t2v", None, "t2v", **_every(1)))
  c.sweep = ml_collections.ConfigDict(dict(
      name="density", seeds=(0, 1, 2), points=tuple(points),
      x_label="captions per chunk (1 / k)", x_log=True))


def _error(c: ml_collections.ConfigDict) -> None:
  _sweep_base(c)
  points = [_point(f"every8_wrong{round(100 * w)}", w, **_every(8, w))
            for w in (0.0, 0.1, 0.3, 0.5)]
  c.sweep = ml_collections.ConfigDict(dict(
      name="error", seeds=(0, 1, 2), points=tuple(points),
      x_label="wrong-caption rate", x_log=False))


def _smoke(c: ml_collections.ConfigDict) -> None:
  # The study's smoke sizes (4-chunk clips, tiny VAE and model, 3 steps) as captions.
  # Its 128-token tokenizer splits a caption into many more tokens than the study's:
  # rows of 4-chunk clips need up to ~75 text slots.
  _captions(c, c.data.toy_world.num_chunks, 1, 0.0)
  c.seq.text_len = 128
  c.sweep = ml_collections.ConfigDict(dict(
      name="smoke", seeds=(0,), points=(_point("every1", 1.0, **_every(1)),
                                         _point("every2", 0.5, **_every(2, 0.5))),
      x_label="captions per chunk (1 / k)", x_log=True))


_VARIANTS = {"density": ("default", _density), "error": ("default", _error),
             "smoke": ("smoke", _smoke)}


def get_config(arg: str = "density") -> ml_collections.ConfigDict:
  """`arg`: density, error or smoke."""
  arg = (arg or "density").strip()
  if arg not in _VARIANTS:
    raise ValueError(f"unknown sweep {arg!r}; known {sorted(_VARIANTS)}")
  study_variant, build = _VARIANTS[arg]
  c = toy_study.get_config(study_variant)
  build(c)
  return c
