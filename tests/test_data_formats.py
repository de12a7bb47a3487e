"""Formats and small policies: keys, webdataset compatibility, manifests, windows, resizing."""
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from hipscale.data import InputError, load_dataset_info
from hipscale.data.format.keys import id_to_key, key_to_id
from hipscale.data.sharding.clip_window import frame_indices, place_window
from hipscale.data.sharding.manifest import read_class_index, read_manifest
from hipscale.data.format.resize import resize_and_crop
from hipscale.data.sharding.shard_writer import samples_per_shard


@pytest.mark.parametrize("sample_id", ["abc_30.000", "--PJHxphWEs", "cat/img 1.jpg", "ü.ß", "a%2E"])
def test_keys_have_no_dots_or_slashes_and_invert(sample_id):
    key = id_to_key(sample_id)
    assert "." not in key and "/" not in key and key_to_id(key) == sample_id
    assert id_to_key("a.b") != id_to_key("a_b")


def test_webdataset_reads_our_shards_with_the_full_keys(av_shards, av_media):
    out = av_shards[0]
    urls = [str(out / shard["name"]) for shard in json.loads((out / "index.json").read_text())["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
    samples = list(dataset)
    assert {s["__key__"] for s in samples} == {id_to_key(clip_id) for clip_id in av_media.labels}
    assert all(set(s) >= {"video.npy", "audio.npy", "meta.json"} for s in samples)


def write(path, text):
    path.write_text(text)
    return path


def test_manifest_and_class_index_parse_audioset_format(tmp_path):
    classes = read_class_index(write(tmp_path / "c.csv", 'index,mid,display_name\n0,/m/a,"Speech, male"\n1,/m/b,Dog\n'))
    assert classes.names == ("Speech, male", "Dog")
    segments, rejections = read_manifest(write(tmp_path / "m.csv", (
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/b,/m/a"\n'
        '\n'
        '-0RWZT-miFs, 420.000, 430.000, "/m/a"\n'
        '--PJHxphWEs, 0.000, 10.000, "/m/a"\n')), classes)
    assert [(s.id, s.start, s.end, s.labels) for s in segments] == [
        ("--PJHxphWEs", 30.0, 40.0, (0, 1)), ("-0RWZT-miFs", 420.0, 430.0, (0,))]
    assert [(r.id, r.reason, r.source.endswith("m.csv:6")) for r in rejections] == [
        ("--PJHxphWEs", "duplicate_id", True)]


@pytest.mark.parametrize("line, message", [
    ('abc, 1.0, "/m/a"', r"m.csv:2: expected 4 columns \(YTID, start_seconds, end_seconds, positive_labels\), got 3"),
    ('abc, one, 2.0, "/m/a"', r"m.csv:2: start_seconds ' ?one' is not a number"),
    ('abc, 3.0, 2.0, "/m/a"', r"m.csv:2: expected a non-empty id and 0 <= start_seconds < end_seconds"),
    ('abc, 1.0, 2.0, "/m/zzz"', r"m.csv:2: positive_labels .* \(unknown: \['/m/zzz'\]\)"),
])
def test_malformed_manifest_lines_are_named(tmp_path, line, message):
    classes = read_class_index(write(tmp_path / "c.csv", "index,mid,display_name\n0,/m/a,A\n"))
    with pytest.raises(InputError, match=message):
        read_manifest(write(tmp_path / "m.csv", f"# header\n{line}\n"), classes)


def test_malformed_class_index_and_missing_files_are_named(tmp_path):
    with pytest.raises(InputError, match=r"c.csv:1: expected the header index,mid,display_name"):
        read_class_index(write(tmp_path / "c.csv", "mid,name\n/m/a,A\n"))
    with pytest.raises(InputError, match=r"c.csv:3: expected index 1, got '2'"):
        read_class_index(write(tmp_path / "c.csv", "index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n"))
    with pytest.raises(InputError, match="nope.csv: file not found"):
        read_class_index(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="index.json not found"):
        load_dataset_info(tmp_path)


def test_window_placement_and_frame_sampling():
    assert place_window(0.0, 10.0, 2.56, "start", 0, "x") == 0.0
    assert place_window(1.0, 4.0, 2.0, "centre", 0, "x") == 1.5
    draws = {place_window(0.0, 10.0, 2.56, "random", 0, f"clip{i}") for i in range(20)}
    assert len(draws) == 20 and all(0.0 <= d <= 10.0 - 2.56 for d in draws)
    assert place_window(0.0, 10.0, 2.56, "random", 0, "clip1") == place_window(0.0, 10.0, 2.56, "random", 0, "clip1")
    assert place_window(0.0, 10.0, 2.56, "random", 1, "clip1") != place_window(0.0, 10.0, 2.56, "random", 0, "clip1")
    # 8 frames in 2.56 s at 25 fps: slice centres 0.16 + 0.32 i s fall exactly on frames 4 + 8 i.
    assert frame_indices(0.0, 2.56, 8, 25.0, 1000) == [4, 12, 20, 28, 36, 44, 52, 60]
    assert frame_indices(0.22, 2.56, 4, 25.0, 75) == [13, 29, 45, 61]  # centres 0.54 + 0.64 i s
    assert frame_indices(0.0, 2.56, 8, 25.0, 10)[-1] == 9  # clipped to the last frame


def test_resize_covers_the_target_and_crops_the_centre():
    columns = np.tile(np.arange(60, dtype=np.uint8)[None, :, None], (30, 1, 3))  # 30x60, value = column
    out = resize_and_crop(Image.fromarray(columns), 20, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(columns).resize((40, 20), Image.Resampling.BICUBIC).crop((10, 0, 30, 20)))
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(resize_and_crop(Image.fromarray(columns), 30, 60), columns)  # same size: untouched


def test_shard_limits_become_a_sample_count():
    assert samples_per_shard(1000, 1 << 30, 1_456_000) == 737
    assert samples_per_shard(10, 1 << 30, 100) == 10
    assert samples_per_shard(10, 50, 100) == 1
    with pytest.raises(InputError):
        samples_per_shard(0, 100, 10)
