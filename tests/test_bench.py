"""The training-step benchmark runs end to end (on CPU here) and prints its figures."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hipscale.bench", "--config", "configs/debug.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bench_prints_step_and_loader_figures(tmp_path):
    from hipscale.data.synthetic_media import make_image_folder

    make_image_folder(tmp_path / "images", num_classes=2, per_class=8, size=(16, 16), unreadable=False)
    shard = subprocess.run([sys.executable, "preprocess/shard_images.py", "--images", str(tmp_path / "images"),
                            "--out", str(tmp_path / "shards"), "--size", "16", "--workers", "1"],
                           cwd=REPO, capture_output=True, text=True)
    assert shard.returncode == 0, shard.stderr
    proc = bench("--batch", "2", "--steps", "3", "--loader", "--set", f"data.train_dir={tmp_path / 'shards'}")
    assert proc.returncode == 0, proc.stderr
    step, loader = proc.stdout.strip().splitlines()[-2:]
    assert step.startswith("batch     2 |") and "samples/s" in step and "first step after" in step
    assert float(step.split("|")[1].split()[0]) > 0
    assert loader.startswith("loader: ") and ("keeps up" in loader or "is the bottleneck" in loader)


def test_bench_refuses_a_sweep_without_gpu_and_bad_keys():
    sweep = bench("--batch", "2", "--sweep")
    assert sweep.returncode == 2 and "no GPU" in sweep.stderr
    bad = bench("--batch", "2", "--set", "optimizer.lrr=1")
    assert bad.returncode == 2 and "optimizer.lrr" in bad.stderr


def test_data_bench_prints_disk_and_object_store_rates_per_core():
    proc = subprocess.run([sys.executable, "-m", "hipscale.data.bench", "--clips", "8", "--source-size", "120x160",
                           "--duration", "3", "--epochs", "2", "--batch-size", "2", "--rounds", "1", "--remote",
                           "--link", "10:200"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines()}
    remote_rows = [f"{loader}, raw, {epochs}" for loader in ("hipscale", "webdataset", "LitData")
                   for epochs in ("first epoch", "later epochs")] + ["hipscale, compressed, first epoch"]
    for source in ("disk, raw", "disk, compressed", "webdataset, raw", *remote_rows):
        assert "samples/s" in lines[source] and "cores for 160 samples/s" in lines[source], proc.stdout
        rate = float(lines[source].split(":")[1].split()[0])
        per_core = float(lines[source].split("per core")[1].split()[0])
        # The workers' CPU counts (they come from a fork server, not from the bench process): the loader
        # keeps more than a quarter of a core busy while it delivers, so a core delivers at most 4x the rate.
        assert 0 < per_core <= 4 * rate, proc.stdout
    for source in remote_rows:
        if "first epoch" in source:  # every shard crossed the 200 Mbit/s link: no first epoch is faster than it
            assert 0 < int(lines[source].split("% of the link")[0].split()[-1]) <= 100, proc.stdout
    waited = int(lines["hipscale, raw, first epoch"].split("workers waited ")[1].split("%")[0])
    assert 0 < waited <= 100, proc.stdout  # on a slow link the workers wait for downloads, and it shows
    assert "the best peer" in lines["first epoch, raw"]
    assert "requests" in lines["object store, one epoch, raw"] and "byte-range" in lines["object store, one epoch, raw"]
    # Behind the emulated 200 Mbit/s link (25 MB/s): neither the download path nor a plain GET passes the cap.
    download = lines["object store, the largest shard, raw (10 ms RTT, 200 Mbit/s link)"].split(":")[1]
    ours, whole = float(download.split("path")[1].split()[0]), float(download.split("memory")[1].split()[0])
    assert 0 < ours <= 25 and 0 < whole <= 25, proc.stdout
    sizes = {encoding: float(lines[encoding].split(":")[1].split()[0]) for encoding in ("raw", "compressed")}
    assert 0 < sizes["compressed"] < sizes["raw"] / 2, proc.stdout  # a whole 3 s clip against one 2.56 s window
    fidelity = lines["compressed vs raw on the same window (8 clips, centre window)"]
    assert float(fidelity.split("PSNR min")[1].split()[0]) >= 35 and fidelity.endswith("difference 0 (int16)")


def test_loader_rows_are_medians_of_rounds_taken_in_alternating_order():
    from hipscale.data.bench_loaders import LoaderRate, alternating_rounds

    calls: list[str] = []

    def measurement(name: str, rates: list[float]):
        def take() -> LoaderRate:
            calls.append(name)
            rate = rates[len([c for c in calls if c == name]) - 1]
            return LoaderRate(rate, 2 * rate, 1 / rate, 0.1)
        return take

    medians = alternating_rounds({"a": measurement("a", [10.0, 30.0, 20.0]),
                                  "b": measurement("b", [5.0, 1.0, 3.0])}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert medians["a"] == LoaderRate(20.0, 40.0, 1 / 20.0, 0.1) and medians["b"].samples_per_s == 3.0
