"""Tars written by webdataset's own TarWriter, as other tools write them.

Images are indexed and streamed as they are, in two layouts: ImageNet-style (``.jpg`` + ``.cls`` + ``.json``) and
img2dataset-style (``.png``/``.webp``/``.jpg`` + ``.json`` holding the class name + ``.txt``), with one undecodable
image. Video tars (video2dataset-style) are converted into our shards in one command.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from hipscale.data import DatasetInfo, StreamingLoader, load_dataset_info
from hipscale.data.synthetic_media import make_image_folder
from train_helpers import REPO

SIZE = 16
PER_SHARD = 5


def encoded(path: Path, form: str) -> bytes:
    if form == "png":
        return path.read_bytes()
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, format={"jpg": "JPEG", "webp": "WEBP"}[form], quality=90)
    return buffer.getvalue()


def as_documented(data: bytes) -> np.ndarray:
    """The documented image policy written out for these 20x28 (HxW) images at 16x16, independently of our code:
    decoded to RGB, bicubic to 16x22 (the shorter side to 16), the centre 16 columns (3 off the left)."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (28, 20)
        return np.asarray(image.convert("RGB").resize((22, 16), Image.Resampling.BICUBIC).crop((3, 0, 19, 16)))


def write_tars(folder: Path, samples: list[dict]) -> None:
    folder.mkdir(parents=True)
    for start in range(0, len(samples), PER_SHARD):
        with wds.TarWriter(str(folder / f"part-{start // PER_SHARD:05d}.tar")) as sink:
            for sample in samples[start:start + PER_SHARD]:
                sink.write(sample)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, tuple[Path, dict[str, tuple[bytes, object]]]]:
    """Both layouts: folder -> (key -> (image bytes, label as stored))."""
    root = tmp_path_factory.mktemp("foreign")
    tree = make_image_folder(root / "tree", num_classes=4, per_class=5, size=(20, 28))
    files = sorted(tree.labels.items())
    imagenet, laion = {}, {}
    a, b = [], []
    for i, (name, label) in enumerate(files):
        jpg = encoded(tree.root / name, "jpg")
        key = f"n{label:04d}_{i:03d}"
        a.append({"__key__": key, "jpg": jpg, "cls": label, "json": {"file": name}})
        imagenet[key] = (jpg, label)
        form = ("png", "webp", "jpg")[i % 3]
        data = encoded(tree.root / name, form)
        key = f"{i:09d}"
        b.append({"__key__": key, form: data, "json": {"label": f"class_{label}", "url": f"http://x/{i}"},
                  "txt": f"a picture of class {label}"})
        laion[key] = (data, f"class_{label}")
    broken = (tree.root / "class_0" / "broken.jpg").read_bytes()
    b.insert(7, {"__key__": "000000999", "jpg": broken, "json": {"label": "class_0"}, "txt": "broken"})
    write_tars(root / "imagenet", a)
    write_tars(root / "laion", b)
    return {"imagenet": (root / "imagenet", imagenet), "laion": (root / "laion", laion)}


def index(location: object, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hipscale.data.index", str(location), "--image-size", str(SIZE),
                           *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def all_samples(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    loader = StreamingLoader(folder, batch_size=1, shuffle_buffer=0, drop_remainder=False)
    found = {}
    for batch in loader:
        if bool(batch["valid"][0]):
            found[batch["key"][0]] = (batch["image"][0].numpy().reshape(SIZE, SIZE, 3), int(batch["label"][0]))
    return found


def test_imagenet_layout_indexed_decoded_like_our_sharder_split_over_ranks_and_resumed(foreign, loader_shards):
    folder, written = foreign["imagenet"]
    done = index(folder)
    assert done.returncode == 0, done.stderr
    assert "20 samples in 4 shards, 4 classes, images [16, 16, 3]" in done.stdout and "bad" not in done.stdout
    info = load_dataset_info(folder)
    assert info.class_names == ("0", "1", "2", "3") and info.attributes["label"] == "cls"
    for shard in info.shards:
        data = (folder / shard.name).read_bytes()
        assert (shard.samples, shard.bytes, shard.sha256) == (PER_SHARD, len(data), hashlib.sha256(data).hexdigest())
    again = index(folder)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    ours = index(loader_shards, "--force")  # our own shards' index is never replaced
    assert ours.returncode == 2 and "written by a hipscale sharder" in ours.stderr

    samples = all_samples(folder)
    assert sorted(samples) == sorted(written)
    for key, (image, label) in samples.items():
        data, stored = written[key]
        assert label == stored and np.array_equal(image, as_documented(data))

    consumed = []
    for rank in range(2):  # 20 samples, batch 2: 5 steps per rank, disjoint
        loader = StreamingLoader(folder, batch_size=2, rank=rank, world_size=2, num_workers=2, seed=3)
        keys = [key for batch in loader for key in batch["key"]]
        assert len(keys) == len(set(keys)) == 10
        consumed.append(set(keys))
    assert not consumed[0] & consumed[1]
    early = []
    for rank in range(2):  # two steps on 2 ranks, then the rest of the epoch on 4: only unseen samples
        loader = StreamingLoader(folder, batch_size=2, rank=rank, world_size=2, num_workers=2, seed=3)
        early += [key for _, batch in zip(range(2), loader) for key in batch["key"]]
    state = loader.state_dict()
    resumed = []
    for rank in range(4):
        loader = StreamingLoader(folder, batch_size=2, rank=rank, world_size=4, num_workers=2, seed=3)
        loader.load_state_dict(state)
        resumed += [key for batch in loader for key in batch["key"]]
    assert len(early) == len(set(early)) == 8 and len(resumed) == len(set(resumed)) == (20 - 8) // 8 * 8
    assert not set(resumed) & set(early)


def test_img2dataset_layout_with_class_names_in_json_and_an_undecodable_image_from_s3(foreign, s3):
    folder, written = foreign["laion"]
    s3.create_bucket("foreign")
    url = s3.upload_folder(folder, "s3://foreign/laion")
    env = {**os.environ, **s3.env}
    done = index(url, "--label", "json:label", env=env)
    assert done.returncode == 0, done.stderr
    assert "21 samples in 5 shards, 4 classes" in done.stdout
    local = index(folder, "--label", "json:label")
    assert local.returncode == 0, local.stderr
    served = index("http://127.0.0.1:9/laion", "--label", "json:label")  # read-only: index.json cannot go there
    assert served.returncode == 2 and served.stderr.startswith(
        "error: LOCATION (where index.json is written) http://127.0.0.1:9/laion: datasets are written to a folder or "
        "to s3, gs, gcs:// URLs, not to an http(s) server"), served.stderr
    remote_index = json.loads(s3.client().get_object(Bucket="foreign", Key="laion/index.json")["Body"].read())
    assert remote_index == json.loads((folder / "index.json").read_text())
    info = DatasetInfo.from_json(remote_index, url)
    assert info.class_names == ("class_0", "class_1", "class_2", "class_3")

    loader = StreamingLoader(folder, batch_size=4, shuffle_buffer=0, drop_remainder=False)
    valid = sum(int(batch["valid"].sum()) for batch in loader)
    assert (valid, loader.bad_samples) == (20, 1)  # the broken image: counted, not fatal
    samples = all_samples(folder)
    assert sorted(samples) == sorted(written)
    for key, (image, label) in samples.items():
        data, name = written[key]
        assert info.class_names[label] == name
        assert np.array_equal(image, as_documented(data))


def stream_copy(path: Path, out: Path, *only: str) -> bytes:
    """One stream of a media file, copied by ffmpeg (``-an``: the video alone, ``-vn``: the audio alone)."""
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), *only, "-c", "copy",
                    str(out)], check=True, timeout=60)
    return out.read_bytes()


def test_video_tars_of_another_tool_convert_in_one_command_into_the_shards_of_their_media(
        av_media, av_shards, av_args, read_shards, tmp_path):
    """video2dataset-style tars (numeric keys, a .json holding the class mids, a caption): some clips carry their
    audio inside the video file (.mp4, .mkv), some as a member of its own (.mp4 + .m4a). Converted, every
    sample's frames, audio and labels equal those of the same clips sharded from their files."""
    files = {path.stem: path for path in av_media.videos.iterdir()}
    samples, original_id = [], {}
    for i, (clip_id, labels) in enumerate(sorted(av_media.labels.items())):
        path, key = files[clip_id], f"{i:09d}"
        original_id[key] = clip_id
        sample = {"__key__": key, "json": {"label": [f"/m/syn{c}" for c in labels], "url": f"http://x/{i}"},
                  "txt": f"clip {i}"}
        if path.suffix == ".mp4" and i % 2:  # as video2dataset writes them: .mp4 video, .m4a audio
            sample[path.suffix[1:]] = stream_copy(path, tmp_path / f"v{i}{path.suffix}", "-an")
            sample["m4a"] = stream_copy(path, tmp_path / f"a{i}.m4a", "-vn")
        else:
            sample[path.suffix[1:]] = path.read_bytes()
        samples.append(sample)
    write_tars(tmp_path / "v2d", samples)
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "hipscale.data.convert_av", str(tmp_path / "v2d"), "--label",
                           "json:label", "--unpack-to", str(tmp_path / "media"), "--out", str(out), "--workers", "1",
                           *av_args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "unpacked 8 clips" in done.stderr and "wrote 8 clips" in done.stdout, (done.stdout, done.stderr)
    reference = {json.loads(sample["meta.json"])["id"]: sample for sample in read_shards(av_shards[0]).values()}
    converted = read_shards(out)
    assert len(converted) == len(av_media.labels) and sum("m4a" in sample for sample in samples) == 2
    for key, sample in converted.items():
        expected = reference[original_id[key]]
        assert sample["video.npy"] == expected["video.npy"] and sample["audio.npy"] == expected["audio.npy"], key
        assert json.loads(sample["meta.json"])["labels"] == json.loads(expected["meta.json"])["labels"]
    # The same tars into compressed shards (any sharder option passes through): the loader decodes every clip.
    compressed = tmp_path / "compressed"
    done = subprocess.run([sys.executable, "-m", "hipscale.data.convert_av", str(tmp_path / "v2d"), "--label",
                           "json:label", "--unpack-to", str(tmp_path / "media-c"), "--out", str(compressed),
                           "--workers", "1", "--encoding", "compressed", *av_args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_dataset_info(compressed).attributes["encoding"] == "compressed"
    loader = StreamingLoader(compressed, batch_size=3, drop_remainder=False)
    decoded = {key: labels for batch in loader for key, labels, valid in zip(batch["key"], batch["labels"],
                                                                                 batch["valid"]) if valid}
    assert loader.bad_samples == 0 and decoded.keys() == converted.keys()
    for key, labels in decoded.items():
        assert np.flatnonzero(labels.numpy()).tolist() == json.loads(converted[key]["meta.json"])["labels"], key
