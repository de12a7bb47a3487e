"""Damaged shards: unreadable samples are logged, counted and skipped; a threshold raises."""
import logging
import shutil
import tarfile

import pytest

from hipscale.data import BadDataError, StreamingLoader


def member_offsets(path) -> list[tuple[str, int, int]]:
    """``(name, header offset, data offset)`` of every member of a tar."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar]


@pytest.fixture
def damaged(loader_shards, tmp_path):
    """A copy of the loader dataset with three kinds of damage; returns (dir, bad count, corrupt key)."""
    data = tmp_path / "data"
    shutil.copytree(loader_shards, data)
    # shard 2: cut inside the data of sample 3 (samples 3..6 of 7 are lost).
    name, _, data_offset = [m for m in member_offsets(data / "shard-000002.tar") if m[0].endswith(".npy")][3]
    with open(data / "shard-000002.tar", "r+b") as file:
        file.truncate(data_offset + 10)
    # shard 7: cut exactly before the header of sample 5 (samples 5, 6 of 7 are lost).
    _, header_offset, _ = [m for m in member_offsets(data / "shard-000007.tar") if m[0].endswith(".npy")][5]
    with open(data / "shard-000007.tar", "r+b") as file:
        file.truncate(header_offset)
    # shard 5: one flipped pixel byte in sample 1 (detected by its CRC-32).
    name, _, data_offset = [m for m in member_offsets(data / "shard-000005.tar") if m[0].endswith(".npy")][1]
    with open(data / "shard-000005.tar", "r+b") as file:
        file.seek(data_offset + 200)
        byte = file.read(1)
        file.seek(data_offset + 200)
        file.write(bytes([byte[0] ^ 0xFF]))
    return data, 4 + 2 + 1, name.split(".")[0]


def test_bad_samples_are_logged_counted_and_skipped(damaged, caplog):
    data, bad_count, corrupt_key = damaged
    loader = StreamingLoader(data, batch_size=4, max_bad_samples=bad_count)
    with caplog.at_level(logging.WARNING, logger="hipscale.data"):
        batches = [batch["key"] for batch in loader]
    assert loader.bad_samples == bad_count
    assert len(batches) == 15 and all(len(keys) == 4 for keys in batches)  # every rank keeps its step count
    served = {key for keys in batches for key in keys}
    assert len(served) == 60 - bad_count and corrupt_key not in served
    log = caplog.text
    assert "shard-000002.tar: 4 wanted samples unreadable: ReadError" in log
    assert "shard-000007.tar: 2 wanted samples unreadable: the shard ends before sample 5" in log
    assert f"shard-000005.tar/{corrupt_key}: image.npy: CRC-32 mismatch" in log


def test_workers_count_bad_samples_too_and_serve_the_same_batches(damaged):
    data, bad_count, _ = damaged
    runs = []
    for workers in (0, 2):
        loader = StreamingLoader(data, batch_size=4, num_workers=workers, max_bad_samples=bad_count)
        runs.append([batch["key"] for batch in loader])
        assert loader.bad_samples == bad_count
    assert runs[0] == runs[1]


def test_too_many_bad_samples_raise(damaged):
    data, bad_count, _ = damaged
    with pytest.raises(BadDataError, match=f"more than max_bad_samples={bad_count - 1}"):
        list(StreamingLoader(data, batch_size=4, num_workers=2, max_bad_samples=bad_count - 1))


def test_a_missing_shard_counts_all_its_samples(loader_shards, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(loader_shards, data)
    (data / "shard-000000.tar").unlink()
    loader = StreamingLoader(data, batch_size=4, max_bad_samples=7)
    with caplog.at_level(logging.WARNING, logger="hipscale.data"):
        assert len(list(loader)) == 15
    assert loader.bad_samples == 7 and "shard-000000.tar: 7 wanted samples unreadable: FileNotFoundError" in caplog.text
