"""Data: offline sharding (``preprocess/``) and the resumable streaming loader.

Example:
    >>> from hipscale.data import DatasetInfo, StreamingLoader
    >>> info = DatasetInfo.load("shards/av")
    >>> loader = StreamingLoader("shards/av", batch_size=8, rank=0, world_size=1, num_workers=4)
    >>> remote = StreamingLoader("s3://bucket/av", batch_size=8)           # through the node's shard cache
    >>> mixed = StreamingLoader([Source("shards/a", 1.0), Source("s3://bucket/b", 3.0)], batch_size=8)
"""
from hipscale.data.dataset_info import DatasetInfo
from hipscale.data.errors import BadDataError, InputError
from hipscale.data.loader import StreamingLoader
from hipscale.data.mixing import Source

__all__ = ["BadDataError", "DatasetInfo", "InputError", "Source", "StreamingLoader"]
