"""Typed config: YAML + `--set` overrides, key-path errors, the ds_config.json merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hipscale.config import ConfigError, config_to_yaml, load_config
from hipscale.training.ds_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs" / "debug.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    merged, _ = build_deepspeed_config(config, bf16=True)
    assert merged["zero_optimization"]["stage"] == config.zero.stage
    assert merged["train_micro_batch_size_per_gpu"] == config.data.micro_batch_size


def test_overrides_are_typed_and_win_over_the_file():
    c = load_config(DEBUG, ["optimizer.lr=3e-4", "zero.stage=3", "optimizer.betas=[0.9, 0.95]",
                            "eval.max_batches=null", "data.synthetic.modalities={audio: [64, 1]}"])
    assert c.optimizer.lr == 3e-4 and isinstance(c.optimizer.lr, float)
    assert c.zero.stage == 3 and c.optimizer.betas == (0.9, 0.95) and c.eval.max_batches is None
    assert c.data.synthetic.modalities == {"audio": [64, 1]}
    assert yaml.safe_load(config_to_yaml(c))["optimizer"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'"),
    ("zero.stage=4", "zero.stage: 4 is not one of 1, 2, 3"),
    ("training.steps=ten", "training.steps: expected an integer"),
    ("optimizer.betas=[0.9]", "optimizer.betas: expected a list of 2 values"),
    ("schedule.warmup_steps=100", "schedule.warmup_steps: must be in [0, training.steps=8]"),
    ("zero.offload_params=cpu", "zero.offload_params: parameter offload needs zero.stage 3"),
    ("objectives.mae_weight=0", None),
    ("activation_checkpoint.policy=some", "activation_checkpoint.policy: 'some' is not one of"),
    ("distributed.timeout_s=0", "distributed.timeout_s: must be >= 1"),
    ("nonsense", "--set expects key.path=value"),
])
def test_bad_keys_and_values_name_the_key_path(override, message):
    if message is None:  # a valid override next to the invalid ones
        assert load_config(DEBUG, [override]).objectives.mae_weight == 0.0
        return
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_save_stage_only_rank_0_reaches_cannot_be_injected_on_another_rank():
    assert load_config(DEBUG, ["faults.kill_point=write", "faults.kill_rank=1"]).faults.kill_rank == 1
    with pytest.raises(ConfigError, match="faults.kill_rank: must be 0 for kill_point 'latest'"):
        load_config(DEBUG, ["faults.kill_point=latest", "faults.kill_rank=1"])


def test_deepspeed_config_merge_yaml_wins_and_conflicts_are_reported(tmp_path):
    base = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 123}, "gradient_clipping": 5.0,
            "optimizer": {"type": "Adam"}, "train_batch_size": 64, "wall_clock_breakdown": True}
    (tmp_path / "ds.json").write_text(json.dumps(base))
    c = load_config(DEBUG, [f"deepspeed_config={tmp_path / 'ds.json'}", "zero.stage=3"])
    merged, conflicts = build_deepspeed_config(c, bf16=False)
    assert merged["zero_optimization"]["stage"] == 3 and merged["zero_optimization"]["reduce_bucket_size"] == 123
    assert merged["gradient_clipping"] == 1.0 and merged["wall_clock_breakdown"] is True
    assert "optimizer" not in merged and "train_batch_size" not in merged
    assert merged["train_micro_batch_size_per_gpu"] == 4 and merged["bf16"] == {"enabled": False}
    text = "\n".join(conflicts)
    for key in ("zero_optimization.stage=1", "gradient_clipping=5.0", "'optimizer'", "'train_batch_size'"):
        assert key in text
    assert len(conflicts) == 4


def test_missing_deepspeed_config_is_a_config_error():
    c = load_config(DEBUG, ["deepspeed_config=/nonexistent/ds.json"])
    with pytest.raises(ConfigError, match="deepspeed_config: cannot read /nonexistent/ds.json"):
        build_deepspeed_config(c, bf16=False)
