"""Weighted mixing of two sources: exact shares per epoch, fresh draws every epoch, exact resume."""
from collections import Counter
from pathlib import Path

import pytest

from hipscale.data import StreamingLoader
from hipscale.data.loading.mixing import Source, mixed_units, sample_counts
from hipscale.data.sharding.shard_images import ImageShardConfig, shard_images
from hipscale.data.synthetic_media import make_image_folder

B = 5  # 60 + 30 samples: 18 batches on one rank, 9 on two, 6 on three


@pytest.fixture(scope="module")
def second_source(tmp_path_factory) -> str:
    """30 raw 8x8 images of the same 3 classes as loader_shards, in shards of up to 4."""
    root = tmp_path_factory.mktemp("second_source")
    make_image_folder(root / "tree", num_classes=3, per_class=10, size=(8, 8), unreadable=False, seed=1)
    shard_images(ImageShardConfig(root / "tree", root / "shards", size=8, encoding="raw", workers=1,
                                  max_samples_per_shard=4))
    return str(root / "shards")


def keys(loader: StreamingLoader, steps: int | None = None) -> list[str]:
    out = []
    for step, batch in enumerate(loader, start=1):
        out += [f"{batch['key'][i]}:{int(batch['image'][i].sum())}" for i in range(len(batch["key"]))]
        if step == steps:
            break
    return out


def source_of(key: str, first: set[str]) -> str:
    return "first" if key in first else "second"


def test_each_epoch_draws_the_weighted_share_of_each_source_anew(loader_shards, second_source):
    assert sample_counts([60, 30], [1.0, 3.0]) == [23, 67] and sum(sample_counts([5, 7, 11], [1, 1, 1])) == 23
    first = set(keys(StreamingLoader(loader_shards, batch_size=1, shuffle_buffer=0)))
    second = set(keys(StreamingLoader(second_source, batch_size=1, shuffle_buffer=0)))
    assert not first & second  # the pixel sums tell the sources' images apart
    mix = [Source(loader_shards, 1.0), Source(second_source, 3.0)]
    epochs = []
    for epoch in range(2):
        loader = StreamingLoader(mix, batch_size=B, num_workers=2, seed=4)
        loader.set_epoch(epoch)
        assert len(loader) == 90 // B
        drawn = keys(loader)
        counts = Counter(drawn)
        assert Counter(source_of(key, first) for key in drawn) == {"first": 23, "second": 67}
        assert all(counts[key] in (2, 3) for key in second)  # 67 = 2 passes of 30 + 7 more
        assert all(counts[key] == 1 for key in first & set(drawn))  # 23 of 60, none twice
        epochs.append(drawn)
    assert set(epochs[0]) & first != set(epochs[1]) & first  # a fresh subset every epoch
    # Mixed, not source after source: both sources show up in the first half of the epoch.
    assert {source_of(key, first) for key in epochs[0][:45]} == {"first", "second"}
    units = mixed_units([[7, 7], [4]], [1.0, 1.0], seed=0, epoch=0)
    assert sum(len(unit.members) for unit in units) == 18


def test_a_mixed_epoch_resumes_exactly_and_on_another_world_size(loader_shards, second_source):
    mix = [Source(loader_shards, 1.0), Source(second_source, 3.0)]

    def make(rank: int, world: int) -> StreamingLoader:
        return StreamingLoader(mix, batch_size=B, rank=rank, world_size=world, num_workers=2, seed=9)

    whole = [keys(make(rank, 2)) for rank in range(2)]
    stopped = [make(rank, 2) for rank in range(2)]
    consumed = [keys(loader, 3) for loader in stopped]
    state = stopped[0].state_dict()
    for rank in range(2):
        resumed = make(rank, 2)
        resumed.load_state_dict(state)
        assert consumed[rank] + keys(resumed) == whole[rank]
    rest = []
    for rank in range(3):
        resumed = make(rank, 3)
        resumed.load_state_dict(state)
        assert len(resumed) == (90 - 30) // (3 * B)
        rest += keys(resumed)
    epoch = Counter(whole[0] + whole[1])
    assert not Counter(consumed[0] + consumed[1] + rest) - epoch  # nothing the epoch did not draw
    assert len(rest) == 60
    with pytest.raises(ValueError, match="dataset"):  # a state of the mix does not resume one source alone
        StreamingLoader(loader_shards, batch_size=B).load_state_dict(state)


def test_sources_that_cannot_be_mixed_are_refused(loader_shards, av_shards):
    with pytest.raises(ValueError, match=f"cannot mix {av_shards[0]} with {loader_shards}: their modalities"):
        StreamingLoader([Source(loader_shards), Source(av_shards[0])], batch_size=B)
    with pytest.raises(ValueError, match="positive weights"):
        StreamingLoader([Source(loader_shards, 0.0)], batch_size=B)


def test_the_config_mixes_sources_and_rejects_a_mix_beside_train_dir(loader_shards, second_source, tmp_path):
    from hipscale.config import ConfigError, load_config
    from hipscale.training.data_setup import build_loader, dataset_info

    mix = f"data.train_mix=[{{dir: {loader_shards}, weight: 1}}, {{dir: {second_source}, weight: 3}}]"
    config = load_config("configs/debug.yaml", [mix, "data.train_dir=''", "data.micro_batch_size=5"])
    loader = build_loader(config, "train", rank=0, world_size=1)
    assert loader.mixed and len(loader) == 90 // 5
    assert Counter(Path(s.location).parent.name for s in loader.sources) == {"loader_data0": 1, "second_source0": 1}
    assert dataset_info(config).num_classes == 3
    with pytest.raises(ConfigError, match="data.train_dir: name the shard folder .* not both"):
        load_config("configs/debug.yaml", [mix, f"data.train_dir={loader_shards}"])
    with pytest.raises(ConfigError, match=r"data.train_mix\[1\].weight: must be > 0"):
        load_config("configs/debug.yaml", [mix.replace("weight: 3", "weight: 0"), "data.train_dir=''"])
