r"""Generates videos with text from a trained checkpoint (docs/sampling.md, "Command line").

    python -m tv2tv_jax.generate --workdir=<train dir> [--checkpoint=<step>] \
        --prompt="toy world" [--prompt="..."] [--first_frame=<png or npy>] \
        --intervene="2:left fire" [--intervene=...] --num_chunks=4 --cfg_scale=2 \
        --ode_steps=8 --seed=0 [--out=<dir>] [--temperature=1 --top_k=0 --top_p=1]

Restores the checkpoint onto whatever devices exist (`run_state.load_params`), loads
the run's text tokenizer and VAE from its prepared data directory (`data.data_dir`, else
the default of `data_pipelines.prepared`: tokenizer.json, vae/, latents/latent_stats.json),
samples with the KV-cached sampler, decodes the latents with the VAE and writes
sample.gif, sample_sheet.png, sample.json (and sample.mp4 when PyAV is installed)
into --out (default <workdir>/samples/<seed>). Several --prompt flags are generated
together, as the rows of one batch, into sample_<k>.*.

--intervene takes '<chunk>:<text>' (chunk index, 0-based) or '<seconds>s:<text>' (the
chunk whose frames span that time, `outputs.chunk_at_time`; the first frame's own
1/fps seconds map to chunk 0).

Without --first_frame a CS:GO or captioned-video run starts from the first latent of
validation clip `seed` of its prepared data, any other from the first frame of toy-world
clip `seed` (the models are trained with a given first frame).
"""

from __future__ import annotations

from absl import app, flags

from tv2tv_jax import video_samples

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_integer("checkpoint", None, "Step to restore (default: newest).")
  flags.DEFINE_multi_string("prompt", None, "Meta-prompt text (repeatable).")
  flags.DEFINE_string("first_frame", None,
                      "PNG (HxWx3 at the VAE's frame size), or .npy of that frame "
                      "(uint8) or of a normalised latent of the model's latent shape.")
  flags.DEFINE_multi_string("intervene", [],
                            "'<chunk>:<text>' or '<seconds>s:<text>' forces that chunk's text.")
  flags.DEFINE_integer("num_chunks", 4, "Chunks to generate (after the first frame).")
  flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1: off).")
  flags.DEFINE_integer("ode_steps", 16, "ODE steps per chunk.")
  flags.DEFINE_enum("solver", "euler", ["euler", "heun"], "ODE solver.")
  flags.DEFINE_integer("seed", 0, "Seed of all randomness.")
  flags.DEFINE_string("out", None, "Output directory (default <workdir>/samples/<seed>).")
  flags.DEFINE_float("temperature", 1.0, "Text sampling temperature.")
  flags.DEFINE_integer("top_k", 0, "Top-k text sampling (0: off).")
  flags.DEFINE_float("top_p", 1.0, "Top-p text sampling (1: off).")
  flags.DEFINE_integer("max_text_tokens", 16, "Cap on one chunk's text tokens.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.prompt:
    raise app.UsageError("--workdir and --prompt are required")
  interventions = video_samples.parse_interventions(FLAGS.intervene)
  paths = video_samples.generate_to_dir(
      FLAGS.workdir, FLAGS.prompt, interventions, FLAGS.num_chunks, FLAGS.cfg_scale,
      FLAGS.ode_steps, FLAGS.seed, FLAGS.out, checkpoint=FLAGS.checkpoint,
      first_frame=FLAGS.first_frame, solver=FLAGS.solver, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p, max_text_tokens=FLAGS.max_text_tokens)
  for p in paths:
    print(p)


if __name__ == "__main__":
  define_flags()
  app.run(main)
