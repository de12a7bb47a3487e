"""The streaming loader that feeds training: the deterministic, resumable epoch plan over shards and ranks
(:mod:`~hipscale.data.loading.plan`), weighted mixing of several datasets (:mod:`~hipscale.data.loading.mixing`),
reading samples from tar shards (:mod:`~hipscale.data.loading.tar_reader`), decoding and batching them
(:mod:`~hipscale.data.loading.batching`), :class:`~hipscale.data.loading.loader.StreamingLoader` with its
worker fork server, and the synthetic loader of tests and benchmarks. It may import
:mod:`hipscale.data.format`, :mod:`hipscale.data.storage` and :mod:`hipscale.data.errors`, never
:mod:`hipscale.data.sharding`.
"""
