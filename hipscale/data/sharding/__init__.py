"""Offline sharding of raw media into the shard format: decoding audio, video and images and cutting clip
windows, reading manifests, planning a dataset into units, building shards in supervised worker processes,
writing them to a local or remote destination with progress and rejection records, and finishing the
dataset with its index (:mod:`~hipscale.data.sharding.run`); :mod:`~hipscale.data.sharding.shard_av` and
:mod:`~hipscale.data.sharding.shard_images` are the two sharders; other tools' video tars are unpacked for the
AV sharder by :mod:`~hipscale.data.sharding.unpack`. It needs no torch. It may import
:mod:`hipscale.data.format`, :mod:`hipscale.data.storage` and :mod:`hipscale.data.errors`, never
:mod:`hipscale.data.loading`; the commands (``preprocess/``, ``python -m hipscale.data.shard_job`` and
friends) in :mod:`hipscale.data` sit on top of it.
"""
