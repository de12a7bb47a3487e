"""Image tars written by webdataset's own TarWriter, as other tools write them, indexed and streamed as they are.

Two layouts: ImageNet-style (``.jpg`` + ``.cls`` + ``.json``) and img2dataset-style (``.png``/``.webp``/``.jpg``
+ ``.json`` holding the class name + ``.txt``), with one undecodable image.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from hipscale.data import DatasetInfo, StreamingLoader, load_dataset_info
from hipscale.data.format.resize import load_image
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


def test_imagenet_layout_indexed_decoded_like_our_sharder_split_over_ranks_and_resumed(foreign):
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

    samples = all_samples(folder)
    assert sorted(samples) == sorted(written)
    for key, (image, label) in samples.items():
        data, stored = written[key]
        assert label == stored and np.array_equal(image, load_image(io.BytesIO(data), SIZE, SIZE)[0])

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
        assert np.array_equal(image, load_image(io.BytesIO(data), SIZE, SIZE)[0])
