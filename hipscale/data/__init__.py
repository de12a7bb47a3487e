"""Data: offline sharding (``preprocess/``) and the resumable streaming loader.

Example:
    >>> from hipscale.data import StreamingLoader, load_dataset_info
    >>> info = load_dataset_info("shards/av")
    >>> loader = StreamingLoader("shards/av", batch_size=8, rank=0, world_size=1, num_workers=4)
    >>> remote = StreamingLoader("s3://bucket/av", batch_size=8)           # through the node's shard cache
    >>> mixed = StreamingLoader([Source("shards/a", 1.0), Source("s3://bucket/b", 3.0)], batch_size=8)

Layout, bottom to top (each layer imports only the ones below it): :mod:`hipscale.data.format` (``index.json``,
sample encoding), :mod:`hipscale.data.storage` (folders, URLs, the shard cache), then
:mod:`hipscale.data.loading` (the streaming loader) and :mod:`hipscale.data.sharding` (the offline sharders)
side by side. The modules directly in this package are the commands on top (``shard_job``, ``shard_ray``,
``status``, ``verify``, ``index``, ``bench``, ``cli`` of ``preprocess/``), the shared errors and synthetic media.

The names below are imported on first use, so the sharders (which need no torch) start without importing
the loader.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"BadDataError": "hipscale.data.errors", "DatasetInfo": "hipscale.data.format.dataset_info",
           "InputError": "hipscale.data.errors", "Source": "hipscale.data.loading.mixing",
           "StreamingLoader": "hipscale.data.loading.loader",
           "load_dataset_info": "hipscale.data.storage.shard_store"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hipscale.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
