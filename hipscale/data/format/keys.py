"""Sample keys that survive webdataset's file-name split.

webdataset (1.0.2 included) groups the files of a tar into samples by the part
of each file name before its first dot, so an id such as the AudioSet-style
``abc_30.000`` would be cut to ``abc_30``. Keys therefore escape every
character outside ``[A-Za-z0-9_-]`` as ``%XX`` (the bytes of its UTF-8
encoding). The escaping is reversible and injective: distinct ids give
distinct keys, and :func:`key_to_id` recovers the original id.
"""
import string
import sys
import tarfile
from typing import BinaryIO, Collection, Iterator
from urllib.parse import unquote

_SAFE = frozenset(string.ascii_letters + string.digits + "_-")
_EVERY_SAMPLE = range(sys.maxsize)


def id_to_key(sample_id: str) -> str:
    """Turns a sample id into a webdataset key with no dots or slashes.

    Args:
        sample_id: Any non-empty id, e.g. ``"abc_30.000"`` or ``"cat/img 1"``.

    Returns:
        The escaped key, e.g. ``"abc_30%2E000"``.

    Raises:
        ValueError: If ``sample_id`` is empty.
    """
    if not sample_id:
        raise ValueError("a sample id must not be empty")
    return "".join(
        char if char in _SAFE else "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
        for char in sample_id
    )


def key_to_id(key: str) -> str:
    """Inverts :func:`id_to_key`.

    Args:
        key: A key made by :func:`id_to_key`.

    Returns:
        The original sample id.
    """
    return unquote(key, errors="strict")


def split_member_name(name: str) -> tuple[str, str]:
    """Splits a tar member name the way webdataset does.

    Args:
        name: A member name such as ``"abc_30%2E000.video.npy"`` (or, in tars of other tools,
            ``"train/n01440764_10026.jpg"``).

    Returns:
        ``(key, extension)``, e.g. ``("abc_30%2E000", "video.npy")``: the extension is everything
        after the first dot of the file's base name, the key everything before it (folders included).
    """
    folder, slash, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return folder + slash + stem, extension


def sample_groups(tar: tarfile.TarFile, wanted: Collection[int], last: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Groups consecutive members by key (a sample); yields ``(index, key, files)`` of the wanted indices up to
    `last` and reads only their data (also from a tar opened as a stream, ``mode="r|"``)."""
    index, key, files = -1, "", {}
    for member in tar:
        member_key, extension = split_member_name(member.name)
        if member_key != key:
            if index in wanted:
                yield index, key, files
            index, key, files = index + 1, member_key, {}
            if index > last:
                return
        if index in wanted and member.isfile():
            files[extension] = tar.extractfile(member).read()
    if index in wanted:
        yield index, key, files


def every_sample(stream: BinaryIO, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of tar `name`, read front to back from `stream`, as ``(key, files)``.

    Raises:
        ValueError: If it is not a readable tar (the message names it).
    """
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for _, key, files in sample_groups(tar, _EVERY_SAMPLE, _EVERY_SAMPLE[-1]):
                yield key, files
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"{name}: not a readable tar ({type(error).__name__}: {error})") from None
