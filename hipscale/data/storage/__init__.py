"""Where shards live and how they are reached: local folders and ``s3://``, ``gs://``, ``http(s)://`` URLs
with timeouts and retries (:mod:`~hipscale.data.storage.remote`), the node's size-bounded, checksum-verified
shard cache (:mod:`~hipscale.data.storage.shard_cache`) and the per-dataset store with background prefetch,
which also reads a dataset's ``index.json`` (:mod:`~hipscale.data.storage.shard_store`). It may import
:mod:`hipscale.data.format` only; the loader and the sharders sit on top of it.
"""
