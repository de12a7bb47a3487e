"""Image datasets in webdataset tars written by other tools, read as they are (no re-sharding).

Two layouts are common: ImageNet-style tars (``K.jpg`` + ``K.cls`` holding the class index as text, often
with ``K.json``) and img2dataset's output (``K.jpg`` + ``K.json`` + ``K.txt``, the class in a field of the
JSON). ``python -m hipscale.data.index`` scans such tars once and writes an ``index.json`` whose
``attributes.layout`` is ``"webdataset"``; the loader then decodes each sample at load time: the first
``.jpg``/``.jpeg``/``.png``/``.webp`` member, EXIF orientation applied, RGB, resized by the image sharder's
policy (:func:`hipscale.data.format.resize.load_image`) to the index's
``[S, S, 3]``, and the class from ``.cls`` or from ``json:FIELD`` (an integer index, or a class name listed
in the index). A sample without a readable image or label is a bad sample, counted like a corrupt one
in our own shards.
"""
from __future__ import annotations

import io
import json
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from hipscale.data.format.dataset_info import DatasetInfo
from hipscale.data.format.resize import load_image
from hipscale.data.format.samples import Sample, SampleError

LAYOUT = "webdataset"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def is_foreign(info: DatasetInfo) -> bool:
    """Whether `info` describes tars of another tool (indexed by ``python -m hipscale.data.index``)."""
    return info.attributes.get("layout") == LAYOUT


def raw_label(files: dict[str, bytes], label: str) -> Any:
    """A sample's class as stored: ``label`` ``"cls"`` -> the ``.cls`` integer, ``"json:FIELD"`` -> that field.

    Raises:
        SampleError: The member or field is missing or unreadable.
    """
    try:
        if label == "cls":
            return int(files["cls"].decode().strip())
        value = json.loads(files["json"])[label.removeprefix("json:")]
    except KeyError as missing:
        raise SampleError(f"no {label} label (missing {missing})") from None
    except (ValueError, UnicodeDecodeError, TypeError) as error:
        raise SampleError(f"unreadable {label} label ({type(error).__name__}: {error})") from None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SampleError(f"{label} label {value!r} is neither a class index nor a class name")
    return value


def image_member(files: dict[str, bytes]) -> bytes:
    """The bytes of the sample's image file (the first of :data:`IMAGE_EXTENSIONS` present, any case)."""
    lowered = {extension.lower(): data for extension, data in files.items()}
    for extension in IMAGE_EXTENSIONS:
        if extension in lowered:
            return lowered[extension]
    raise SampleError(f"no image file (.{'/.'.join(IMAGE_EXTENSIONS)}) among {sorted(files)}")


def decode_foreign_sample(key: str, files: dict[str, bytes], info: DatasetInfo) -> Sample:
    """Decodes one sample of another tool's tars as :func:`hipscale.data.format.samples.decode_sample` does ours.

    Returns:
        The sample, its ``image`` ``[S, S, 3]`` uint8.

    Raises:
        SampleError: No or an undecodable image, no or an unknown label.
    """
    (name, spec), = info.specs.items()
    try:
        array, _ = load_image(io.BytesIO(image_member(files)), spec.shape[0], spec.shape[1])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise SampleError(f"cannot decode the image ({type(error).__name__}: {error})") from error
    value = raw_label(files, info.attributes["label"])
    index = value if isinstance(value, int) else _class_indices(info.class_names).get(value)
    if index is None or not 0 <= index < info.num_classes:
        raise SampleError(f"label {value!r} is not one of the index's {info.num_classes} classes")
    return Sample(key, key, {name: np.ascontiguousarray(array)}, (index,))


@lru_cache(maxsize=8)
def _class_indices(class_names: tuple[str, ...]) -> dict[str, int]:
    return {name: index for index, name in enumerate(class_names)}
