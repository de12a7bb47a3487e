"""Data: offline sharding (``preprocess/``) and the resumable streaming loader.

Example:
    >>> from hipscale.data import DatasetInfo, StreamingLoader
    >>> info = DatasetInfo.load("shards/av")
    >>> loader = StreamingLoader("shards/av", batch_size=8, rank=0, world_size=1, num_workers=4)
    >>> remote = StreamingLoader("s3://bucket/av", batch_size=8)           # through the node's shard cache
    >>> mixed = StreamingLoader([Source("shards/a", 1.0), Source("s3://bucket/b", 3.0)], batch_size=8)

The names below are imported on first use, so the sharders (which need no torch) start without importing
the loader.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"BadDataError": "hipscale.data.errors", "DatasetInfo": "hipscale.data.dataset_info",
           "InputError": "hipscale.data.errors", "Source": "hipscale.data.mixing",
           "StreamingLoader": "hipscale.data.loader"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hipscale.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
