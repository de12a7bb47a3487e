"""`python -m hipscale.data.verify`: a copied shard folder checked against the sizes and hashes in index.json."""
import json
import shutil
import subprocess
import sys

from train_helpers import REPO, new_user_env


def verify(*folders) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hipscale.data.verify", *map(str, folders)], cwd=REPO,
                          env=new_user_env(), capture_output=True, text=True, timeout=120)


def test_verify_names_every_missing_truncated_or_altered_shard(debug_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(debug_shards["train"], copy)
    shards = sorted(copy.glob("shard-*.tar"))
    clean = verify(copy)
    assert clean.returncode == 0 and f"{len(shards)} of {len(shards)} shards check out" in clean.stdout, clean

    data = bytearray(shards[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:-512])  # truncated
    shards[2].unlink()
    broken = verify(copy, tmp_path / "nothing_here")
    lines = broken.stdout.splitlines()
    assert broken.returncode == 2  # the folder without an index.json
    assert any(f"{shards[0].name}: sha256 " in line for line in lines), lines
    assert any(f"{shards[1].name}: size " in line for line in lines), lines
    assert any(f"{shards[2].name}: missing" in line for line in lines), lines
    assert f"{len(shards) - 3} of {len(shards)} shards check out" in broken.stdout
    assert "nothing_here: error:" in broken.stderr
    assert verify(copy).returncode == 1
    as_json = verify("--json", copy, tmp_path / "nothing_here")
    assert as_json.returncode == 2
    reports = json.loads(as_json.stdout)["folders"]
    assert [r["folder"] for r in reports] == [str(copy), str(tmp_path / "nothing_here")]
    assert reports[0]["shards"] == len(shards) and len(reports[0]["problems"]) == 3
    assert reports[0]["problems"] == [line[len(f"{copy}/"):] for line in lines if line.startswith(f"{copy}/")]
    assert "error" in reports[1] and "problems" not in reports[1]
    url = verify("s3://bucket/shards")
    assert url.returncode == 2 and "verified as the loader downloads them" in url.stderr
