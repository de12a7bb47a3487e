"""The image sharder: ImageFolder trees, list files, raw and JPEG storage, the digits tree."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from hipscale.data import InputError, StreamingLoader, load_dataset_info
from hipscale.data.format.keys import id_to_key, key_to_id
from hipscale.data.format.samples import decode_sample
from hipscale.data.sharding.shard_images import ImageShardConfig, shard_images
from hipscale.data.synthetic_media import write_digits_imagefolder


def policy_16(path) -> np.ndarray:
    """The documented policy for a 24x32 (HxW) image at size 16: bicubic to 21x16 (WxH), crop columns 2..17."""
    return np.asarray(Image.open(path).convert("RGB").resize((21, 16), Image.Resampling.BICUBIC).crop((2, 0, 18, 16)))


def test_image_folder_is_sharded_and_the_unreadable_image_reported(image_tree, run_sharder, read_shards, tmp_path):
    out = tmp_path / "out"
    done = run_sharder("shard_images.py", "--images", image_tree.root, "--out", out, "--size", 16,
                       "--encoding", "raw", "--workers", 2, "--max-samples-per-shard", 5)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert {r["id"]: r["reason"] for r in report["rejections"]} == image_tree.bad == {
        "class_0/broken.jpg": "unreadable_image"}
    assert report["written"] == 18
    info = load_dataset_info(out)
    assert info.class_names == ("class_0", "class_1", "class_2") and not info.multi_label
    assert [shard.samples for shard in info.shards] == [4, 5, 5, 4]  # 19 items by 5; broken.jpg is item 0
    samples = read_shards(out)
    assert set(samples) == {id_to_key(relative) for relative in image_tree.labels}
    for key, files in samples.items():
        sample = decode_sample(key, files, info)
        relative = key_to_id(key)
        assert sample.labels == (image_tree.labels[relative],)
        np.testing.assert_array_equal(sample.arrays["image"], policy_16(image_tree.root / relative))


def test_jpeg_storage_decodes_close_to_the_resized_image(image_tree, tmp_path):
    shard_images(ImageShardConfig(image_tree.root, tmp_path, size=16, quality=95))
    info = load_dataset_info(tmp_path)
    assert info.specs["image"].encoding == "jpeg"
    batch = next(iter(StreamingLoader(tmp_path, batch_size=6)))
    for image, key in zip(batch["image"].numpy(), batch["key"]):
        expected = policy_16(image_tree.root / key_to_id(key)).astype(np.int16)
        assert np.abs(image.reshape(16, 16, 3).astype(np.int16) - expected).mean() < 4  # q95, 4:4:4, noise images


def test_list_file_reports_missing_and_duplicate_entries(image_tree, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nclass_1/img_000.png,cat\nclass_2/img_000.png,dog\n"
                       "class_1/img_000.png,cat\nnowhere/gone.png,dog\nclass_0/img_001.png,ant\n")
    report = shard_images(ImageShardConfig(image_tree.root, tmp_path / "out", list_file=listing, size=8))
    assert {r["id"]: r["reason"] for r in report["rejections"]} == {
        "class_1/img_000.png": "duplicate_id", "nowhere/gone.png": "missing_file"}
    info = load_dataset_info(tmp_path / "out")
    assert info.class_names == ("ant", "cat", "dog") and info.num_samples == 3


def test_bad_image_settings_and_lists_are_refused_with_a_clear_message(image_tree, tmp_path):
    with pytest.raises(InputError, match="size must be in 1..2048"):
        ImageShardConfig(image_tree.root, tmp_path, size=4096)
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nclass_1/img_000.png\n")
    with pytest.raises(InputError, match=r"list.csv:2: expected 2 non-empty columns"):
        shard_images(ImageShardConfig(image_tree.root, tmp_path / "out", list_file=listing))


def test_rerun_with_other_settings_into_the_same_directory_is_refused(image_tree, tmp_path):
    shard_images(ImageShardConfig(image_tree.root, tmp_path, size=8))
    with pytest.raises(InputError, match="written with other settings"):
        shard_images(ImageShardConfig(image_tree.root, tmp_path, size=12))
    report = shard_images(ImageShardConfig(image_tree.root, tmp_path, size=12, overwrite=True))
    assert report["written"] == 18 and load_dataset_info(tmp_path).specs["image"].shape == (12, 12, 3)


def test_digits_tree_round_trips_through_the_sharder_and_loader(tmp_path):
    splits = write_digits_imagefolder(tmp_path / "digits", test_fraction=0.25, seed=0)
    counts = {split: len(list(root.rglob("*.png"))) for split, root in splits.items()}
    assert counts == {"train": 1347, "test": 450}
    report = shard_images(ImageShardConfig(splits["test"], tmp_path / "shards", size=8, encoding="raw", workers=2))
    assert report == {"written": 450, "rejected": 0, "by_reason": {}, "rejections": []}
    digits = load_digits()
    seen = 0
    for batch in StreamingLoader(tmp_path / "shards", batch_size=50, num_workers=1):
        for image, label, key in zip(batch["image"].numpy(), batch["label"].tolist(), batch["key"]):
            index = int(key_to_id(key).split("/")[1].split(".")[0])
            assert label == digits.target[index]
            expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
            np.testing.assert_array_equal(image[:, 0].reshape(8, 8), expected)
            seen += 1
    assert seen == 450


def test_images_are_shuffled_across_shards_unless_the_order_is_kept(image_tree, run_sharder, tmp_path):
    """An ImageFolder lists images class by class: by default the shards mix classes (seeded), and
    --keep-order writes them class by class."""
    import tarfile

    def shard_labels(out) -> list[list[int]]:
        labels = []
        for shard in load_dataset_info(out).shards:
            with tarfile.open(out / shard.name) as tar:
                labels.append([json.loads(tar.extractfile(m).read())["labels"][0] for m in tar
                               if m.name.endswith(".meta.json")])
        return labels

    runs = {}
    for name, extra in (("shuffled", []), ("again", []), ("kept", ["--keep-order"])):
        out = tmp_path / name
        done = run_sharder("shard_images.py", "--images", image_tree.root, "--out", out, "--size", 8,
                           "--encoding", "raw", "--workers", 1, "--max-samples-per-shard", 6, *extra)
        assert done.returncode == 0, done.stderr
        runs[name] = shard_labels(out)
    kept = [label for shard in runs["kept"] for label in shard]
    assert kept == sorted(kept) and max(len(set(shard)) for shard in runs["kept"]) <= 2  # class by class
    assert runs["shuffled"] == runs["again"]  # seeded
    shuffled = [label for shard in runs["shuffled"] for label in shard]
    assert sorted(shuffled) == kept and shuffled != kept
    assert sum(len(set(shard)) == 3 for shard in runs["shuffled"]) >= 2
