"""Remote datasets: shards read from an S3-compatible server (moto) and an HTTP server with Range requests on
loopback, through the node's shard cache, against the same shards read from their folder."""
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hipscale.data import StreamingLoader, load_dataset_info
from hipscale.data.storage.remote import CorruptDownloadError, RemoteLocation, RetryPolicy, part_bytes
from hipscale.data.storage.request_queue import RequestQueue
from hipscale.data.storage.shard_cache import ShardCache, dataset_folder
from hipscale.data.storage.shard_store import RemoteSettings, ShardPrefetcher, ShardStore
from hipscale.tools.local_storage import RangeHTTPServer
from hipscale.tools.slow_link import SlowLink

B = 4


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The S3 server's endpoint and credentials in this process's standard AWS environment."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture(scope="module")
def loader_url(s3, loader_shards) -> str:
    """The loader shards uploaded to s3://loader/shards."""
    s3.create_bucket("loader")
    return s3.upload_folder(loader_shards, "s3://loader/shards")


def settings(tmp_path: Path, **changes) -> RemoteSettings:
    return RemoteSettings(**{"cache_dir": str(tmp_path / "cache"), **changes})


def batches(loader: StreamingLoader, steps: int | None = None) -> list[tuple[list[str], int]]:
    """``(keys, pixel sum)`` of the next ``steps`` batches (all of the epoch: None)."""
    out = []
    for batch in loader:
        out.append((batch["key"], int(batch["image"].sum())))
        if steps is not None and len(out) == steps:
            break
    return out


def test_s3_and_http_datasets_stream_the_folders_batches_and_resume_on_another_world_size(
        s3_env, loader_url, loader_shards, tmp_path):
    def make(location, rank: int, world: int, remote: RemoteSettings | None = None) -> StreamingLoader:
        return StreamingLoader(location, batch_size=B, rank=rank, world_size=world, num_workers=2, seed=3,
                               remote=remote)

    remote = settings(tmp_path)
    assert load_dataset_info(loader_url, remote).fingerprint == load_dataset_info(loader_shards).fingerprint
    for rank in range(2):
        assert batches(make(loader_url, rank, 2, remote)) == batches(make(loader_shards, rank, 2))
    # Two steps on 2 ranks from s3, then the rest of the epoch on 1 rank: the same as from the folder.
    stopped = make(loader_url, 0, 2, remote)
    batches(stopped, 2)
    resumed = {}
    for location in (loader_url, loader_shards):
        loader = make(location, 0, 1, remote if location == loader_url else None)
        loader.load_state_dict(stopped.state_dict())
        resumed[location] = batches(loader)
    assert len(resumed[loader_url]) == (60 - 16) // B and resumed[loader_url] == resumed[loader_shards]
    with RangeHTTPServer(loader_shards) as http:
        assert batches(make(http.url, 1, 2, settings(tmp_path / "http"))) == batches(make(loader_shards, 1, 2))


def test_cache_stays_within_its_limit_and_downloads_a_shard_once_for_all_readers(loader_shards, tmp_path):
    info = load_dataset_info(loader_shards)
    largest = max(shard.bytes for shard in info.shards)
    with RangeHTTPServer(loader_shards) as http:
        # Four processes want the same shard at once: one download.
        remote = RemoteLocation(http.url)
        cache = ShardCache(tmp_path / "cache", limit_bytes=10 * largest)
        with mp.get_context("fork").Pool(4) as pool:
            paths = pool.starmap(_fetch_and_hash, [(cache, remote, info.shards[0])] * 4)
        assert len(set(paths)) == 1 and http.requests[f"/{info.shards[0].name}"] == 1
        # An epoch of 9 shards on 2 workers through a cache that holds 4, what the readers may hold at once
        # (each the shard it reads and the one it prefetches): the same batches, the limit kept.
        limited = settings(tmp_path / "small", cache_limit_gb=4 * largest / 1e9, prefetch_shards=1)
        loader = StreamingLoader(http.url, batch_size=B, num_workers=2, remote=limited)
        assert batches(loader) == batches(StreamingLoader(loader_shards, batch_size=B, num_workers=2))
        small = ShardCache(limited.cache_root, 1)
        assert len(info.shards) == 9 and 0 < small.usage_bytes() <= 4 * largest
        assert all(http.requests[f"/{shard.name}"] >= 1 for shard in info.shards if shard.samples)


def _fetch_and_hash(cache: ShardCache, remote: RemoteLocation, entry) -> str:
    with cache.fetch(remote, entry) as path:
        time.sleep(0.2)  # hold it while the others wait
        return str(path)


def test_a_server_that_stops_answering_costs_time_not_the_run(s3_env, loader_url, loader_shards,
                                                                       tmp_path):
    remote = settings(tmp_path, prefetch_shards=0, policy=RetryPolicy(request_timeout_s=1, retry_for_s=60))
    loader = StreamingLoader(loader_url, batch_size=B, num_workers=2, remote=remote)  # reads index.json
    expected = batches(StreamingLoader(loader_shards, batch_size=B, num_workers=2))
    began = time.monotonic()
    s3_env.pause()  # before any shard is read
    threading.Timer(6.0, s3_env.resume).start()
    got = batches(loader)
    assert got == expected and loader.bad_samples == 0
    assert time.monotonic() - began > 6.0


def test_a_server_that_goes_away_and_comes_back_costs_time_not_the_run(loader_shards, tmp_path):
    """Connections refused for 5 s (the HTTP server stopped, then a new one on its port): retried with backoff."""
    remote = settings(tmp_path, prefetch_shards=0, policy=RetryPolicy(request_timeout_s=2, retry_for_s=60))
    expected = batches(StreamingLoader(loader_shards, batch_size=B, num_workers=2))
    first = RangeHTTPServer(loader_shards)
    second = RangeHTTPServer(loader_shards, first.port)
    done = threading.Event()

    def come_back() -> None:  # this thread keeps the new server (its child) until the epoch is read
        time.sleep(5.0)
        with second:
            done.wait(120)

    returner = threading.Thread(target=come_back)
    began = time.monotonic()
    try:
        with first:
            loader = StreamingLoader(first.url, batch_size=B, num_workers=2, remote=remote)  # reads index.json
        returner.start()  # the server is gone before any shard is read
        got = batches(loader)
        assert got == expected and loader.bad_samples == 0 and time.monotonic() - began > 5.0
        assert sum(second.requests.values()) > 0  # the rest came from the server that came back
    finally:
        done.set()
        if returner.is_alive():
            returner.join()


def test_a_shard_corrupted_on_the_server_is_downloaded_three_times_then_counted_bad(loader_shards, tmp_path,
                                                                                  caplog):
    served = tmp_path / "served"
    served.mkdir()
    for path in loader_shards.iterdir():
        if path.is_file():
            (served / path.name).write_bytes(path.read_bytes())
    info = load_dataset_info(loader_shards)
    corrupt, missing = info.shards[2], info.shards[5]
    data = bytearray((served / corrupt.name).read_bytes())
    data[700] ^= 0xFF  # same size, another hash
    (served / corrupt.name).write_bytes(bytes(data))
    (served / missing.name).unlink()
    with RangeHTTPServer(served) as http, caplog.at_level(logging.WARNING):
        loader = StreamingLoader(http.url, batch_size=1, shuffle_buffer=0,
                                 remote=settings(tmp_path, policy=RetryPolicy(retry_for_s=5)))
        keys = [key for batch in loader for key in batch["key"]]
        assert http.requests[f"/{corrupt.name}"] == 3  # each download verified, two retried
    assert loader.bad_samples == corrupt.samples + missing.samples
    good = [key for key in (k for batch in StreamingLoader(loader_shards, batch_size=1, shuffle_buffer=0)
                            for k in batch["key"])]
    assert len(keys) == len(good) == 60
    assert len(set(good) - set(keys)) == corrupt.samples + missing.samples
    assert f"{http.url}/{corrupt.name}: sha256" in caplog.text and "(in each of 3 downloads)" in caplog.text
    assert f"cannot download {http.url}/{missing.name}: FileNotFoundError" in caplog.text


def test_a_missing_remote_dataset_is_reported_with_its_url(s3_env, loader_url, tmp_path):
    with pytest.raises(OSError, match="cannot read s3://loader/nothing-here/index.json: FileNotFoundError"):
        load_dataset_info("s3://loader/nothing-here", settings(tmp_path))


def test_a_sharder_writing_to_s3_killed_and_rerun_uploads_the_folder_runs_dataset(
        s3, av_media, av_shards, av_args, sharder_command, read_shards, tmp_path):
    """The AV sharder with --out s3://: SIGKILL to its process group once two shards are uploaded, then a
    re-run: the uploaded shards are kept, the rest built, and the dataset equals the folder run's bytes."""
    s3.create_bucket("sharded")
    client = s3.client()
    env = {**os.environ, **s3.env}
    command = sharder_command("shard_av.py", "--manifest", av_media.manifest, "--class-index", av_media.class_index,
                              "--videos", av_media.videos, "--out", "s3://sharded/av",
                              "--staging", tmp_path / "staging",
                              "--workers", 1, *av_args)

    def objects() -> dict[str, object]:
        listed = client.list_objects_v2(Bucket="sharded", Prefix="av/").get("Contents", [])
        return {entry["Key"].removeprefix("av/"): entry["LastModified"] for entry in listed}

    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while sum(name.startswith("status/") for name in objects()) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the sharder finished before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = objects()
    assert "index.json" not in before and 2 <= sum(name.startswith("shard-") for name in before) < 5

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    after = objects()
    assert all(after[name] == stamp for name, stamp in before.items() if name.startswith(("shard-", "status/")))
    local_index = json.loads((av_shards[0] / "index.json").read_text())
    remote_index = json.loads(client.get_object(Bucket="sharded", Key="av/index.json")["Body"].read())
    assert remote_index["shards"] == local_index["shards"]  # names, counts, sizes and SHA-256: the same bytes
    downloaded = tmp_path / "downloaded"
    for name in after:
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        client.download_file("sharded", f"av/{name}", str(downloaded / name))
    assert read_shards(downloaded) == read_shards(av_shards[0])
    assert json.loads((downloaded / "report.json").read_text())["by_reason"] == \
        json.loads((av_shards[0] / "report.json").read_text())["by_reason"]
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]  # uploaded copies deleted


def test_a_download_comes_in_concurrent_ranged_parts_hashed_in_order(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    blob = os.urandom(20_000_000)
    (served / "blob").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    with RangeHTTPServer(served) as http:
        remote = RemoteLocation(http.url, RetryPolicy(retry_for_s=5))
        assert part_bytes(len(blob), 4) == 8 << 20  # 3 parts: 8 + 8 + 3.2 MiB
        remote.download("blob", tmp_path / "got", len(blob), digest, streams=4)
        assert (tmp_path / "got").read_bytes() == blob and http.requests["/blob"] == 3
        with pytest.raises(CorruptDownloadError, match=f"{http.url}/blob: 20000000 bytes, index.json says 19999999"):
            remote.download("blob", tmp_path / "got", len(blob) - 1, digest)
        assert http.requests["/blob"] == 3  # a size the index does not list: refused before any GET
        with pytest.raises(CorruptDownloadError, match=f"{http.url}/blob: sha256 {digest}, index.json says 0+$"):
            remote.download("blob", tmp_path / "got", len(blob), "0" * 64, streams=2)


FORKED_READER = """
import gc, multiprocessing as mp, sys, time
from hipscale.data.storage.remote import RemoteLocation

def read_then_collect(remote, seconds):
    began = time.perf_counter()
    remote.read_bytes("index.json")  # a filesystem of its own: the parent's is dropped
    gc.collect()
    seconds.put(time.perf_counter() - began)

remote = RemoteLocation(sys.argv[1])
remote.read_bytes("index.json")
context = mp.get_context("fork")
seconds = context.Queue()
worker = context.Process(target=read_then_collect, args=(remote, seconds))
worker.start()
print(seconds.get(timeout=60))
worker.join(timeout=60)
sys.exit(worker.exitcode)
"""


def test_a_forked_worker_frees_nothing_it_inherited_from_the_parents_s3_session(s3, loader_url):
    """A DataLoader worker forked from a process that read from s3 makes its own filesystem; the parent's must
    not be freed there: its finalizer would wait a second on the parent's event loop, which the fork did not
    copy (a stall per epoch and worker, wherever the garbage collector runs)."""
    proc = subprocess.run([sys.executable, "-c", FORKED_READER, loader_url], env={**os.environ, **s3.env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 0.9  # a new session and a read: 0.2-0.3 s; a stall: 1 s more


def test_the_request_queue_serves_the_older_downloads_parts_first():
    """A reader's next shard downloads beside the one it needs now; the needed one's GETs go first."""
    requests, ran = RequestQueue(1), []
    older, younger, release = requests.new_download(), requests.new_download(), threading.Event()
    busy = requests.submit(requests.new_download(), 0, release.wait)  # holds the only stream
    parts = [requests.submit(download, offset, lambda d=download, o=offset: ran.append((d, o)))
             for download, offset in ((younger, 0), (younger, 8), (older, 8), (older, 0))]
    release.set()
    busy.result(timeout=10)
    for part in parts:
        part.result(timeout=10)
    assert ran == [(older, 0), (older, 8), (younger, 0), (younger, 8)]


def test_a_reader_prefetches_past_a_shard_another_reader_is_downloading(loader_shards, tmp_path):
    """Two DataLoader workers read the same shards in the same order: while one downloads a shard, the other
    fetches the ones after it instead of waiting, no more than the prefetch depth, and takes the shard from
    the cache when its turn comes."""
    info = load_dataset_info(loader_shards)
    with RangeHTTPServer(loader_shards) as http:
        store = ShardStore(http.url, settings(tmp_path, prefetch_shards=2))
        lock_path = store.cache.root / dataset_folder(http.url) / ".locks" / f"{info.shards[1].name}.download"
        lock_path.parent.mkdir(parents=True)
        with open(lock_path, "ab") as other_reader:  # another reader downloads shard 1
            fcntl.flock(other_reader, fcntl.LOCK_EX)
            assert store.downloading_elsewhere(info.shards[1]) and not store.downloading_elsewhere(info.shards[2])
            with ShardPrefetcher([(store, shard) for shard in info.shards[:6]]) as reader:
                reader.take(0).close()
                deadline = time.monotonic() + 10
                while len(http.requests) < 3 and time.monotonic() < deadline:  # the threads fetch 2 and 3
                    time.sleep(0.01)
                time.sleep(0.2)  # and stop there: they hold 2 (the prefetch depth) not yet taken
                assert dict(http.requests) == {f"/{info.shards[i].name}": 1 for i in (0, 2, 3)}  # 1 passed over
                fcntl.flock(other_reader, fcntl.LOCK_UN)  # the other reader gave up: this one fetches shard 1
                reader.take(1).close()
                assert http.requests[f"/{info.shards[1].name}"] == 1
                reader.take(2).close()
                assert http.requests[f"/{info.shards[2].name}"] == 1  # taken from the thread, not fetched again


READER = """
import json, os, sys, time
from hipscale.data import StreamingLoader
from hipscale.data.storage.shard_store import RemoteSettings
url, cache, progress, resume = sys.argv[1:5]
began = time.perf_counter()
loader = StreamingLoader(url, batch_size=4, num_workers=2, seed=11, remote=RemoteSettings(cache_dir=cache))
keys = []
if resume != "-":
    saved = json.loads(open(resume).read())
    loader.load_state_dict(saved["state"])
for step, batch in enumerate(loader, start=1):
    keys += batch["key"]
    with open(progress + ".tmp", "w") as f:
        json.dump({"steps": step, "keys": keys, "state": loader.state_dict(), "wait_s": loader.fetch_wait_s,
                   "wall_s": time.perf_counter() - began}, f)
    os.replace(progress + ".tmp", progress)
"""


def test_a_first_epoch_through_a_slow_link_delivers_every_sample_once_and_resumes_exactly_after_a_sigkill(
        s3, loader_url, loader_shards, tmp_path):
    """The S3 server behind a 10 ms, 0.4 Mbit/s link: a shard takes about half a second to arrive. A reader
    (2 DataLoader workers) is SIGKILLed with its workers while a download is under way; a new one, from the
    position the first saved after its last step, delivers the rest of the epoch: every sample once, in the
    order of an uninterrupted reader. The workers' time waiting for downloads is counted."""
    cache, progress = tmp_path / "cache", tmp_path / "progress.json"
    with SlowLink(s3.port, rtt_ms=10, mbit_s=0.4) as link:
        env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": link.endpoint}

        def reader(resume: str, out: Path) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", READER, loader_url, str(cache), str(out), resume],
                                    env=env, start_new_session=True)

        first = reader("-", progress)
        try:
            deadline = time.monotonic() + 60
            while not (progress.exists() and list(cache.rglob(".*.part"))):  # a step done, a download under way
                assert first.poll() is None and time.monotonic() < deadline, "no download under way after a step"
                time.sleep(0.02)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        saved = json.loads(progress.read_text())
        assert 1 <= saved["steps"] < 15
        rest = tmp_path / "rest.json"
        second = reader(str(progress), rest)
        assert second.wait(timeout=120) == 0
    resumed = json.loads(rest.read_text())
    delivered = saved["keys"] + resumed["keys"]
    assert len(delivered) == len(set(delivered)) == 60
    from_folder = StreamingLoader(loader_shards, batch_size=4, num_workers=2, seed=11)
    uninterrupted = [key for batch in from_folder for key in batch["key"]]
    assert delivered == uninterrupted
    # Through the slow link the 2 workers spend most of their time waiting for downloads, and say so; from
    # the folder they hardly wait.
    assert 2 * resumed["wall_s"] > resumed["wait_s"] > 0.5 * 2 * resumed["wall_s"], resumed
    assert from_folder.fetch_wait_s < 0.5
