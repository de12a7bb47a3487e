"""Shared fixtures: synthetic media made once per session, and sharded; the digits training, started early."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from hipscale.data.sharding.shard_images import ImageShardConfig, shard_images
from hipscale.data.synthetic_media import SyntheticAV, SyntheticImages, make_av_dataset, make_image_folder
from train_helpers import start_digits_training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def digits_training(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """tests/test_digits.py's training (about 100 s of 2 processes), started in the background with the session's
    first test when that test is selected: the single-process tests that run before it leave a core idle about
    half of the time. Yields ``(job, run folder)`` (see ``train_helpers.start_digits_training``), or None."""
    if not any(item.path.name == "test_digits.py" for item in request.session.items):
        yield None
        return
    job, run_dir = start_digits_training(tmp_path_factory.mktemp("digits"))
    yield job, run_dir
    job.kill()


@pytest.fixture(scope="session")
def av_args() -> tuple[str, ...]:
    """Sharding options of the session's AV shards: 4 frames of 48x40, default audio (48 kHz, 2.56 s)."""
    return ("--frames", "4", "--height", "48", "--width", "40", "--max-samples-per-shard", "3")


@pytest.fixture(scope="session")
def sharder_command() -> Callable[..., list[str]]:
    """Builds the command line running ``preprocess/<script>`` with the test interpreter."""

    def command(script: str, *args: object) -> list[str]:
        return [sys.executable, str(REPO / "preprocess" / script), *map(str, args)]

    return command


@pytest.fixture(scope="session")
def run_sharder(sharder_command) -> Callable[..., subprocess.CompletedProcess]:
    """Runs ``preprocess/<script>`` in a subprocess and returns the finished process."""

    def run(script: str, *args: object) -> subprocess.CompletedProcess:
        return subprocess.run(sharder_command(script, *args), capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(scope="session")
def av_media(tmp_path_factory: pytest.TempPathFactory) -> SyntheticAV:
    """8 good 64x64 3 s clips (some two-label, some .mkv) and one clip of every bad kind."""
    return make_av_dataset(tmp_path_factory.mktemp("av_media"), num_clips=8, num_classes=4)


@pytest.fixture(scope="session")
def av_shards(av_media: SyntheticAV, av_args, run_sharder,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``(out_dir, stdout)`` of one ``shard_av.py`` run over :func:`av_media`."""
    out = tmp_path_factory.mktemp("av_shards")
    done = run_sharder("shard_av.py", "--manifest", av_media.manifest, "--class-index", av_media.class_index,
                       "--videos", av_media.videos, "--out", out, "--workers", 2, *av_args)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> SyntheticImages:
    """3 classes x 6 noise images of 24x32 PNG, plus one unreadable ``class_0/broken.jpg``."""
    return make_image_folder(tmp_path_factory.mktemp("image_tree"), num_classes=3, per_class=6, size=(24, 32))


@pytest.fixture(scope="session")
def loader_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 raw 8x8 images (3 classes) in 9 uneven shards of up to 7 samples, for loader tests."""
    root = tmp_path_factory.mktemp("loader_data")
    make_image_folder(root / "tree", num_classes=3, per_class=20, size=(8, 8), unreadable=False)
    shard_images(ImageShardConfig(root / "tree", root / "shards", size=8, encoding="raw", workers=2,
                                  max_samples_per_shard=7))
    return root / "shards"


@pytest.fixture(scope="session")
def read_shards() -> Callable[[Path], dict[str, dict[str, bytes]]]:
    """Returns a reader of every sample of a shard directory: key -> {extension: bytes}.

    It checks, with plain :mod:`tarfile`, that each shard listed in
    ``index.json`` holds exactly its listed number of samples and that no key
    appears twice in the dataset.
    """

    def read(out_dir: Path) -> dict[str, dict[str, bytes]]:
        samples: dict[str, dict[str, bytes]] = {}
        for shard in json.loads((out_dir / "index.json").read_text())["shards"]:
            keys_in_shard = []
            with tarfile.open(out_dir / shard["name"]) as tar:
                for member in tar:
                    key, extension = member.name.split(".", 1)
                    if not keys_in_shard or keys_in_shard[-1] != key:
                        assert key not in samples, f"duplicate key {key}"
                        keys_in_shard.append(key)
                        samples[key] = {}
                    samples[key][extension] = tar.extractfile(member).read()
            assert len(keys_in_shard) == shard["samples"], shard
        return samples

    return read


@pytest.fixture(scope="session")
def debug_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train and eval shards for configs/debug.yaml: class-striped 16x16 images (learnable in a few steps)."""
    from test_train_units import make_image_folder as make_striped_images
    from train_helpers import shard_debug_data

    return shard_debug_data(tmp_path_factory.mktemp("debug_data"), make_striped_images)


@pytest.fixture(scope="session")
def s3():
    """moto's S3-compatible server on loopback for the session (hipscale.tools.local_storage.S3Server)."""
    from hipscale.tools.local_storage import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def debug_shards_s3(s3, debug_shards) -> dict[str, str]:
    """The debug train and eval shards uploaded to s3://debug/train and s3://debug/eval."""
    s3.create_bucket("debug")
    return {split: s3.upload_folder(folder, f"s3://debug/{split}") for split, folder in debug_shards.items()}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running one-node SLURM for the session (tests/slurm_helpers.py); yields its clients' environment."""
    from slurm_helpers import one_node_slurm

    with one_node_slurm(tmp_path_factory.mktemp("slurm")) as slurm_env:
        yield slurm_env
