"""The typed run config: every section a frozen dataclass, built in one place, misspellings named."""

import dataclasses
import json

import pytest

from experiments import csgo_3b, toy_study, toy_world
from tv2tv_jax import config as config_lib


@pytest.mark.parametrize("section,key,field,hint", [
    ("data", "synthetic_batchez", "data.synthetic_batchez", "synthetic_batches"),
    ("sample", "after_trainig", "sample.after_trainig", "after_training"),
    ("init", "llama_dri", "init.llama_dri", "llama_dir"),
])
def test_a_misspelt_field_is_named_not_defaulted(section, key, field, hint):
  cfg = toy_world.get_config("tiny").to_dict()
  cfg.setdefault(section, {})[key] = 1
  with pytest.raises(config_lib.ConfigError, match=f"did you mean '{hint}'") as err:
    config_lib.run_config_from_config_dict(cfg)
  assert err.value.field == field


def test_a_misspelt_section_is_named():
  cfg = toy_world.get_config("tiny").to_dict()
  cfg["smaple"] = {"after_training": True}
  with pytest.raises(config_lib.ConfigError, match="did you mean 'sample'") as err:
    config_lib.run_config_from_config_dict(cfg)
  assert err.value.field == "smaple"


def test_saved_config_round_trips_and_retired_fields_load():
  """A config.json (lists for tuples) gives the same typed config; fields older runs
  saved (data.vae_variant) are dropped, so their checkpoints still load."""
  cfg = toy_world.get_config("quick")
  want = config_lib.run_config_from_config_dict(cfg)
  saved = json.loads(cfg.to_json_best_effort())
  assert config_lib.run_config_from_config_dict(saved) == want
  saved["data"]["vae_variant"] = "quick"
  assert config_lib.run_config_from_config_dict(saved) == want
  hash(want)  # frozen all the way down: usable as a cache key


def test_defaults_have_one_source():
  from data_pipelines import grain_pipeline
  pipeline = grain_pipeline.PipelineConfig(latent_dir="l", tokenizer_path="t")
  data = config_lib.DataConfig()
  for name in grain_pipeline.PIPELINE_DATA_FIELDS:
    assert getattr(pipeline, name) == getattr(data, name)
  empty = config_lib.run_config_from_config_dict({})
  assert empty.mesh == config_lib.MeshConfig() and empty.data == data


def test_sections_of_the_experiment_files():
  study = config_lib.run_config_from_config_dict(toy_study.get_config("smoke"))
  assert study.study.arms == config_lib.LAYOUTS and study.study.eval.uncond == "mask"
  paper = config_lib.run_config_from_config_dict(csgo_3b.get_config("cpu_test,think2v"))
  assert paper.exp.seq.layout == "think2v" and paper.data.source == "csgo"
  assert paper.data.builder_config["validation_every"] == 3
  assert dataclasses.replace(paper, mesh=config_lib.MeshConfig()).mesh.data == -1


@pytest.mark.parametrize("module,arg", [(toy_world, "tiny,nope"), (csgo_3b, "nope")])
def test_every_variant_argument_is_parsed_alike(module, arg):
  with pytest.raises(ValueError, match=r"unknown config variant 'nope'; variants .*, "
                     r"layouts \['tv2tv', 't2v', 'think2v'\]"):
    module.get_config(arg)
