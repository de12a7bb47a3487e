"""Data: offline sharding (``preprocess/``) and the resumable streaming loader.

Example:
    >>> from hipscale.data import DatasetInfo, StreamingLoader
    >>> info = DatasetInfo.load("shards/av")
    >>> loader = StreamingLoader("shards/av", batch_size=8, rank=0, world_size=1, num_workers=4)
"""
from hipscale.data.dataset_info import DatasetInfo
from hipscale.data.errors import BadDataError, InputError
from hipscale.data.loader import StreamingLoader

__all__ = ["BadDataError", "DatasetInfo", "InputError", "StreamingLoader"]
