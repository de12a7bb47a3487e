"""Dataset info and loaders for the configured data source (shards or synthetic)."""
from __future__ import annotations

from typing import Any

from hipscale.config.schema import DataConfig, JobConfig
from hipscale.data.loading.synthetic_loader import SyntheticLoader, synthetic_info


def dataset_info(config: JobConfig) -> Any:
    """The training set's info: .modalities {name: (index_dim, channels, dtype)}, .num_classes, .multi_label."""
    if config.data.source == "synthetic":
        return synthetic_info(config.data.synthetic)
    from hipscale.data import load_dataset_info
    from hipscale.data.loading.mixing import load_sources

    if config.data.train_mix:  # checks that the sources can be mixed
        return load_sources(train_sources(config.data), remote_settings(config.data))[0]
    return load_dataset_info(config.data.train_dir, remote_settings(config.data))


def train_sources(data: DataConfig) -> Any:
    """data.train_dir, or the data.train_mix sources (a list of hipscale.data.loading.mixing.Source)."""
    from hipscale.data.loading.mixing import Source

    return [Source(source.dir, source.weight) for source in data.train_mix] if data.train_mix else data.train_dir


def remote_settings(data: DataConfig) -> Any:
    """The shard cache, prefetch, timeouts and retries of URL datasets (RemoteSettings)."""
    from hipscale.data.storage.remote import RetryPolicy
    from hipscale.data.storage.shard_store import RemoteSettings

    return RemoteSettings(data.cache_dir, data.cache_limit_gb, data.prefetch_shards,
                          RetryPolicy(data.remote_timeout_s, data.remote_retry_s))


def build_loader(config: JobConfig, split: str, rank: int, world_size: int) -> Any:
    """A loader of `split` ("train" or "eval") for this rank (StreamingLoader or SyntheticLoader)."""
    batch = config.data.micro_batch_size if split == "train" else (config.eval.micro_batch_size
                                                                     or config.data.micro_batch_size)
    seed = config.run.seed + (0 if split == "train" else 1)
    if config.data.source == "synthetic":
        return SyntheticLoader(config.data.synthetic, batch, rank, world_size, seed)
    from hipscale.data import StreamingLoader

    data_dir = train_sources(config.data) if split == "train" else config.data.eval_dir
    return StreamingLoader(data_dir, batch_size=batch, rank=rank, world_size=world_size,
                           num_workers=config.data.num_workers, seed=seed,
                           shuffle_buffer=config.data.shuffle_buffer, drop_remainder=split == "train",
                           max_bad_samples=None,  # the trainer limits the count over all ranks
                           remote=remote_settings(config.data), worker_timeout_s=config.data.worker_timeout_s,
                           stall_sample=config.faults.stall_sample)


def has_eval(config: JobConfig) -> bool:
    return config.data.source == "synthetic" or config.data.eval_dir is not None
