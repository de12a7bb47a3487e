"""hipscale: Hierarchical Perceiver training on raw inputs at cluster scale."""
from setuptools import find_packages, setup

setup(
    name="hipscale",
    version="0.1.0",
    description="Train Hierarchical Perceivers (HiP) on raw pixels and audio with DeepSpeed.",
    packages=find_packages(include=["hipscale", "hipscale.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed by the Makefile first (CPU wheel pinned to 2.13.0 on
        # machines without a GPU); any recent 2.x works, the GPU machine runs 2.11.
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "webdataset==1.0.2",
        "decord==0.6.0",
        "imageio-ffmpeg>=0.5",
        "av>=14.0",  # PyAV: the FLAC audio of compressed AV shards, decoded in the loader's workers
        "ffmpeg-python>=0.2",
        "pillow>=10.0",
        "tensorboard>=2.14",
        "torchmetrics>=1.4",
        "isal>=1.6",  # CRC-32 of every sample payload (zlib's values, ISA-L's speed)
    ],
    extras_require={
        # DeepSpeed is built without ops (DS_BUILD_OPS=0); the Makefile sets that.
        "train": ["deepspeed==0.19.8", "huggingface_hub>=0.20"],
        "mpi": ["mpi4py>=3.1"],
        # Datasets and sharder outputs at s3://, gs:// and http(s):// URLs (hipscale.data.storage.remote).
        "remote": ["fsspec[http]>=2024.6", "s3fs>=2024.6", "gcsfs>=2024.6"],
        # python -m hipscale.data.shard_ray: sharding on a Ray cluster (every node needs it).
        "ray": ["ray>=2.40"],
        # moto's S3-compatible server on loopback: the remote-data tests and `hipscale.data.bench --remote`.
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "scikit-learn>=1.3", "psutil>=5.9", "ruff==0.14.5",
                 "moto[server]>=5.0", "boto3>=1.34"],
    },
    entry_points={"console_scripts": []},
)
