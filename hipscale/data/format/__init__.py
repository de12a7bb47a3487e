"""The on-disk format of a sharded dataset, the bottom layer of :mod:`hipscale.data`: the ``index.json``
description (:mod:`~hipscale.data.format.dataset_info`: modalities, classes, shard list), the tar member names
of a sample (:mod:`~hipscale.data.format.keys`), how one sample's arrays and labels are encoded and decoded
(:mod:`~hipscale.data.format.samples`; other tools' image tars: :mod:`~hipscale.data.format.foreign_shards`) and
the image resize policy both sides share (:mod:`~hipscale.data.format.resize`). It builds and parses bytes and dicts only, and imports nothing else
from hipscale: storage, the loader and the sharders all import it, never the other way round.
"""
