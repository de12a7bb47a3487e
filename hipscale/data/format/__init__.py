"""The on-disk format of a sharded dataset, the bottom layer of :mod:`hipscale.data`: the ``index.json``
description (:mod:`~hipscale.data.format.dataset_info`: modalities, classes, shard list), the tar member names
of a sample (:mod:`~hipscale.data.format.keys`) and how one sample's arrays and labels are encoded and decoded
(:mod:`~hipscale.data.format.samples`). It builds and parses bytes and dicts only, and imports nothing else
from hipscale: storage, the loader and the sharders all import it, never the other way round.
"""
