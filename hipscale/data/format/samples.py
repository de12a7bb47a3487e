"""Encoding and decoding of one sample's files inside a shard.

A sample with key ``K`` is stored as consecutive tar members:

- ``K.<modality>.npy`` per raw modality (numpy .npy; video ``[T, H, W, 3]``
  uint8, audio ``[S]`` int16, image ``[H, W, 3]`` uint8), or
  ``K.<modality>.jpg`` for JPEG-encoded images, or ``K.video.mp4`` and
  ``K.audio.flac`` for compressed clips (:mod:`hipscale.data.format.clip_codec`);
- ``K.meta.json``: ``{"id": original id, "labels": [class indices],
  "crc32": {file extension: CRC-32 of its bytes}, ...}`` plus per-sharder
  details (window start, frame indices, ...).

The CRC-32s let the loader detect silently corrupted payloads, not only
truncated ones.
"""
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from isal.isal_zlib import crc32  # zlib's CRC-32, 11x faster (ISA-L): checked on every payload read
from PIL import Image

from hipscale.data.format.clip_codec import (CENTRE, ClipCodecError, WindowChoice, audio_offset, decode_audio,
                                             decode_video)
from hipscale.data.format.dataset_info import COMPRESSED_CLIP, DatasetInfo, ModalitySpec

META_EXTENSION = "meta.json"
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class SampleError(Exception):
    """A sample that cannot be decoded or does not match ``index.json``."""


@dataclass(frozen=True)
class Sample:
    """A decoded sample.

    Attributes:
        key: The webdataset key (see :mod:`hipscale.data.format.keys`).
        sample_id: The original id.
        arrays: Modality name -> array of the modality's stored shape.
        labels: Class indices.
    """

    key: str
    sample_id: str
    arrays: dict[str, np.ndarray]
    labels: tuple[int, ...]


def encode_sample(
    key: str,
    sample_id: str,
    arrays: dict[str, np.ndarray],
    specs: dict[str, ModalitySpec],
    labels: tuple[int, ...],
    extra_meta: dict[str, Any] | None = None,
    jpeg_quality: int = 95,
) -> list[tuple[str, bytes]]:
    """Encodes a sample into tar members.

    Args:
        key: The sample key (no dots).
        sample_id: The original id, stored in ``meta.json``.
        arrays: Modality name -> array of ``specs[name].shape``.
        specs: How each modality is stored.
        labels: Class indices.
        extra_meta: Further ``meta.json`` fields.
        jpeg_quality: Quality of JPEG-encoded modalities.

    Returns:
        ``[(member name, bytes), ...]``, payloads first, ``meta.json`` last.
    """
    payloads = {f"{name}.{spec.extension}": _encode_array(arrays[name], spec, jpeg_quality)
                for name, spec in specs.items()}
    return sample_members(key, sample_id, payloads, labels, extra_meta)


def sample_members(key: str, sample_id: str, payloads: dict[str, bytes], labels: tuple[int, ...],
                   extra_meta: dict[str, Any] | None = None) -> list[tuple[str, bytes]]:
    """The tar members of a sample whose payloads are encoded already (file extension -> bytes), payloads
    first, then ``meta.json`` with their CRC-32s."""
    members = [(f"{key}.{extension}", data) for extension, data in payloads.items()]
    checksums = {extension: crc32(data) for extension, data in payloads.items()}
    meta = {"id": sample_id, "labels": list(labels), "crc32": checksums, **(extra_meta or {})}
    members.append((f"{key}.{META_EXTENSION}", json.dumps(meta, sort_keys=True).encode()))
    return members


def decode_sample(key: str, files: dict[str, bytes], info: DatasetInfo, window: WindowChoice = CENTRE) -> Sample:
    """Decodes and checks the files of one sample.

    Args:
        key: The sample key.
        files: File extension (e.g. ``"video.npy"``) -> bytes.
        info: The dataset description the sample must match.
        window: Which window of a compressed clip to decode (:mod:`hipscale.data.format.clip_codec`); other
            encodings ignore it.

    Returns:
        The decoded sample.

    Raises:
        SampleError: On a missing file, a checksum mismatch, undecodable
            bytes, a shape or dtype other than ``index.json`` says, or labels
            out of range.
    """
    if META_EXTENSION not in files:
        raise SampleError(f"missing {META_EXTENSION}")
    try:
        meta = json.loads(files[META_EXTENSION])
        sample_id, labels, checksums = str(meta["id"]), tuple(int(i) for i in meta["labels"]), meta["crc32"]
    except (ValueError, KeyError, TypeError) as error:
        raise SampleError(f"unreadable {META_EXTENSION}: {error}") from error
    arrays = {}
    chosen = _window_of(key, meta, info, window)
    for name, spec in info.specs.items():
        extension = f"{name}.{spec.extension}"
        data = files.get(extension)
        if data is None:
            raise SampleError(f"missing {extension}")
        if crc32(data) != checksums.get(extension):
            raise SampleError(f"{extension}: CRC-32 mismatch (corrupt bytes)")
        arrays[name] = (_decode_array(data, spec, extension) if chosen is None
                        else _decode_window(data, spec, extension, chosen, info))
    if any(not 0 <= label < info.num_classes for label in labels):
        raise SampleError(f"labels {labels} outside [0, {info.num_classes})")
    if not info.multi_label and len(labels) != 1:
        raise SampleError(f"single-label dataset but the sample has labels {labels}")
    return Sample(key, sample_id, arrays, labels)


def _encode_array(array: np.ndarray, spec: ModalitySpec, jpeg_quality: int) -> bytes:
    if array.shape != spec.shape or array.dtype != np.dtype(spec.dtype):
        raise ValueError(f"array {array.shape} {array.dtype} does not match {spec}")
    buffer = io.BytesIO()
    if spec.encoding == "jpeg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _decode_array(data: bytes, spec: ModalitySpec, extension: str) -> np.ndarray:
    try:
        if spec.encoding == "jpeg":
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image.convert("RGB"))
        else:
            array = _npy_view(data)
    except (OSError, ValueError, SyntaxError) as error:
        raise SampleError(f"{extension}: cannot decode ({type(error).__name__}: {error})") from error
    return _as_specified(array, spec, extension)


def _as_specified(array: np.ndarray, spec: ModalitySpec, extension: str) -> np.ndarray:
    """`array` if it has the spec's shape and dtype."""
    if array.shape != spec.shape or array.dtype != np.dtype(spec.dtype):
        raise SampleError(f"{extension}: got {array.shape} {array.dtype}, index.json says {spec.shape} {spec.dtype}")
    return array


def _npy_view(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` file's bytes, as a read-only view of them (``np.load`` would copy it)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_HEADER_READERS:
        raise ValueError(f".npy format version {version} (this reader knows {sorted(_NPY_HEADER_READERS)})")
    shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - stream.tell() < count * dtype.itemsize:
        raise ValueError(f"{len(data) - stream.tell()} bytes of data for {shape} {dtype}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)


def _window_of(key: str, meta: dict[str, Any], info: DatasetInfo, window: WindowChoice) -> int | None:
    """The window a compressed clip is decoded at (None for other encodings)."""
    if not any(spec.encoding in COMPRESSED_CLIP for spec in info.specs.values()):
        return None
    windows = meta.get("windows")
    if not isinstance(windows, int) or windows < 1:
        raise SampleError(f"unreadable {META_EXTENSION}: windows {windows!r} (a compressed clip needs >= 1)")
    return window.index(key, windows)


def _decode_window(data: bytes, spec: ModalitySpec, extension: str, window: int, info: DatasetInfo) -> np.ndarray:
    """Window `window` of a compressed member, of the spec's shape."""
    rate = info.frame_rate
    try:
        if spec.encoding == "h264":
            array = decode_video(data, window, spec.shape[0])
        else:
            array = decode_audio(data, audio_offset(window, int(info.attributes["sample_rate"]), rate), spec.shape[0])
    except ClipCodecError as error:
        raise SampleError(f"{extension}: {error}") from error
    return _as_specified(array, spec, extension)
