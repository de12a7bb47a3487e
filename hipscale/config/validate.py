"""Cross-field checks of a JobConfig; each failure names the key path."""
from __future__ import annotations

from hipscale.config.errors import ConfigError
from hipscale.config.schema import JobConfig

_SYNTHETIC_MODALITIES = ("image", "video", "audio")


def validate_config(c: JobConfig) -> None:
    """Raise ConfigError for the first invalid value or combination in `c`."""
    _check(bool(c.run.name) and "/" not in c.run.name, "run.name", "must be a non-empty name without '/'")
    _check(c.model.processor_index_dim_train is None or c.model.processor_index_dim_eval is None,
           "model.processor_index_dim_eval", "only one of processor_index_dim_train/_eval may be set")
    _check(0.0 <= c.model.dropout_prob < 1.0, "model.dropout_prob", "must be in [0, 1)")
    _check(0.0 <= c.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    _check(c.data.source == "synthetic" or bool(c.data.train_dir) != bool(c.data.train_mix), "data.train_dir",
           "name the shard folder (or URL) in data.train_dir, or several sources in data.train_mix, not both, "
           "when data.source is 'shards'")
    for i, source in enumerate(c.data.train_mix):
        _check(bool(source.dir), f"data.train_mix[{i}].dir", "must name a shard folder or URL")
        _check(source.weight > 0, f"data.train_mix[{i}].weight", "must be > 0")
    _check(c.data.micro_batch_size >= 1, "data.micro_batch_size", "must be >= 1")
    _check(c.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(c.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0: shards permuted, samples not)")
    _check(c.data.max_bad_samples >= 0, "data.max_bad_samples", "must be >= 0")
    _check(c.data.cache_limit_gb > 0, "data.cache_limit_gb", "must be > 0 (gigabytes)")
    _check(c.data.prefetch_shards >= 0, "data.prefetch_shards", "must be >= 0")
    _check(c.data.remote_timeout_s > 0, "data.remote_timeout_s", "must be > 0 (seconds)")
    _check(c.data.remote_retry_s >= 0, "data.remote_retry_s", "must be >= 0 (seconds; 0: no retries)")
    _check(c.data.worker_timeout_s is None or c.data.worker_timeout_s > 0, "data.worker_timeout_s",
           "must be > 0 (seconds) or null (no limit)")
    _validate_synthetic(c)
    o = c.objectives
    _check(o.mae_weight >= 0, "objectives.mae_weight", "must be >= 0")
    _check(o.classification_weight >= 0, "objectives.classification_weight", "must be >= 0")
    _check(o.mae_weight > 0 or o.classification_weight > 0, "objectives", "at least one loss weight must be > 0")
    _check(0.0 < o.mask_ratio < 1.0 or o.mae_weight == 0, "objectives.mask_ratio",
           "must be in (0, 1) when objectives.mae_weight > 0")
    _validate_augment(c)
    p = c.optimizer
    _check(p.lr > 0, "optimizer.lr", "must be > 0")
    _check(all(0.0 <= b < 1.0 for b in p.betas), "optimizer.betas", "must lie in [0, 1)")
    _check(p.eps > 0, "optimizer.eps", "must be > 0")
    _check(p.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(p.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(c.training.steps >= 1, "training.steps", "must be >= 1")
    _check(c.training.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps", "must be >= 1")
    g = c.training.global_batch_size
    _check(g is None or (g >= 1 and g % c.data.micro_batch_size == 0), "training.global_batch_size",
           f"must be a positive multiple of data.micro_batch_size={c.data.micro_batch_size} (or null), got {g}")
    _check(g is None or c.training.gradient_accumulation_steps == 1, "training.gradient_accumulation_steps",
           "is derived from training.global_batch_size when that is set: set only one of them")
    _check(c.training.max_consecutive_nonfinite >= 1, "training.max_consecutive_nonfinite", "must be >= 1")
    _check(c.distributed.timeout_s >= 1, "distributed.timeout_s", "must be >= 1 (seconds)")
    _check(c.distributed.heartbeat_timeout_s >= 0, "distributed.heartbeat_timeout_s", "must be >= 0 (seconds; 0: off)")
    _check(c.faults.kill_rank >= 0, "faults.kill_rank", "must be >= 0")
    _check(c.faults.step_delay_s >= 0, "faults.step_delay_s", "must be >= 0 (seconds)")
    _check(c.faults.kill_point == "write" or c.faults.kill_rank == 0, "faults.kill_rank",
           f"must be 0 for kill_point '{c.faults.kill_point}': only rank 0 writes COMPLETE and `latest`")
    _check(0 <= c.schedule.warmup_steps <= c.training.steps, "schedule.warmup_steps",
           f"must be in [0, training.steps={c.training.steps}]")
    _check(0.0 <= c.schedule.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
    _check(c.zero.offload_params == "none" or c.zero.stage == 3, "zero.offload_params",
           "parameter offload needs zero.stage 3")
    _check(c.activation_checkpoint.every_k >= 1, "activation_checkpoint.every_k", "must be >= 1")
    _check(c.activation_checkpoint.min_groups >= 1, "activation_checkpoint.min_groups", "must be >= 1")
    _check(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    _check(c.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _check(c.logging.every_steps >= 1, "logging.every_steps", "must be >= 1")
    _check(c.logging.pictures >= 0, "logging.pictures", "must be >= 0 (0: no pictures)")
    _check(c.logging.peak_tflops is None or c.logging.peak_tflops > 0, "logging.peak_tflops", "must be > 0")
    _check(c.eval.every_steps >= 0, "eval.every_steps", "must be >= 0")
    _check(c.eval.max_batches is None or c.eval.max_batches >= 1, "eval.max_batches", "must be >= 1")
    _check(c.eval.micro_batch_size is None or c.eval.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1")


def _validate_augment(c: JobConfig) -> None:
    a = c.augment
    low, high = a.crop_scale
    _check(0.0 < low <= high <= 1.0, "augment.crop_scale", f"must be [low, high] with 0 < low <= high <= 1, got {a.crop_scale}")
    low, high = a.crop_ratio
    _check(0.0 < low <= high, "augment.crop_ratio", f"must be [low, high] with 0 < low <= high, got {a.crop_ratio}")
    _check(a.color_ops >= 0, "augment.color_ops", "must be >= 0")
    _check(0.0 <= a.color_magnitude <= 10.0, "augment.color_magnitude", "must be in [0, 10] (RandAugment's scale)")
    _check(a.mixup_alpha >= 0, "augment.mixup_alpha", "must be >= 0 (0: off)")
    _check(a.cutmix_alpha >= 0, "augment.cutmix_alpha", "must be >= 0 (0: off)")
    _check(0.0 <= a.cutmix_switch_prob <= 1.0, "augment.cutmix_switch_prob", "must be in [0, 1]")
    _check(0.0 <= a.mix_prob <= 1.0, "augment.mix_prob", "must be in [0, 1]")
    _check(0.0 <= a.label_smoothing < 1.0, "augment.label_smoothing", "must be in [0, 1)")
    _check(a.clip_seconds is None or a.clip_seconds > 0, "augment.clip_seconds", "must be > 0 seconds (or null)")
    _check(a.clip_seconds is None or c.data.source == "shards", "augment.clip_seconds",
           "needs audio/video shards (data.source: shards)")


def _validate_synthetic(c: JobConfig) -> None:
    s = c.data.synthetic
    _check(len(s.modalities) > 0, "data.synthetic.modalities", "must name at least one modality")
    for name, shape in s.modalities.items():
        path = f"data.synthetic.modalities.{name}"
        _check(name in _SYNTHETIC_MODALITIES, path, f"unknown modality; use one of {', '.join(_SYNTHETIC_MODALITIES)}")
        _check(isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v >= 1 for v in shape),
               path, f"must be [index_dim, channels] of positive integers, got {shape!r}")
    _check(s.num_classes >= 2, "data.synthetic.num_classes", "must be >= 2")
    _check(s.num_samples >= 1, "data.synthetic.num_samples", "must be >= 1")


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")
