"""Synthetic labelled media for tests, the demo and the benchmark.

Clips are made by ffmpeg from lavfi sources: a ``testsrc2`` pattern (which
moves, so every frame differs) whose hue depends on the clip's first class,
and a sum of sines, one per class, at :func:`class_frequency`. Images are
class-coloured noise. :func:`write_digits_imagefolder` writes scikit-learn's
real 8x8 digits as an ImageFolder tree.
"""
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import numpy as np
from PIL import Image

# Bad media kind -> the rejection reason the AV sharder must report.
BAD_CLIP_REASONS = {
    "missing": "missing_file",
    "corrupt": "decode_error",
    "truncated": "decode_error",
    "short": "too_short",
    "no_audio": "no_audio",
}


@dataclass(frozen=True)
class SyntheticAV:
    """An AudioSet-format synthetic dataset.

    Attributes:
        videos: Directory of ``<id>.mp4`` / ``<id>.mkv`` clips.
        manifest: AudioSet segment CSV.
        class_index: ``index,mid,display_name`` CSV.
        labels: Id of every good clip -> its class indices.
        bad: Id of every bad clip -> the expected rejection reason.
    """

    videos: Path
    manifest: Path
    class_index: Path
    labels: dict[str, tuple[int, ...]]
    bad: dict[str, str]


@dataclass(frozen=True)
class SyntheticImages:
    """An ImageFolder-style synthetic image tree.

    Attributes:
        root: Tree root; one sub-directory per class.
        labels: Relative path of every good image -> class index.
        bad: Relative path of every unreadable image -> ``"unreadable_image"``.
    """

    root: Path
    labels: dict[str, int]
    bad: dict[str, str]


def class_frequency(label: int) -> float:
    """Returns the tone frequency in Hz of a class: ``300 + 150 * label``."""
    return 300.0 + 150.0 * label


def make_clip(path: Path, labels: tuple[int, ...], num_classes: int, duration: float = 3.0,
              size: tuple[int, int] = (64, 64), fps: int = 25, sample_rate: int = 48_000, audio: bool = True) -> Path:
    """Writes one labelled clip (H.264 video, AAC audio) with ffmpeg.

    Args:
        path: Output file; the extension picks the container.
        labels: Class indices; the first sets the hue, each adds a tone.
        num_classes: K, to spread hues over the colour circle.
        duration: Seconds.
        size: ``(height, width)``, even numbers.
        fps: Frame rate.
        sample_rate: Audio rate in Hz.
        audio: Whether to add the audio track.

    Returns:
        ``path``.
    """
    height, width = size
    streams = [ffmpeg.input(f"testsrc2=size={width}x{height}:rate={fps}:duration={duration}", f="lavfi")
               .video.filter("hue", h=360.0 * labels[0] / num_classes)]
    if audio:
        tones = "+".join(f"{0.6 / len(labels):.4f}*sin(2*PI*{class_frequency(c)}*t)" for c in labels)
        streams.append(ffmpeg.input(f"aevalsrc={tones}:s={sample_rate}:d={duration}", f="lavfi").audio)
    codecs = {"vcodec": "libx264", "pix_fmt": "yuv420p", **({"acodec": "aac"} if audio else {})}
    ffmpeg.output(*streams, str(path), **codecs).overwrite_output().global_args("-nostdin", "-v", "error").run(
        cmd=imageio_ffmpeg.get_ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    return path


def make_av_dataset(root: Path, num_clips: int = 8, num_classes: int = 4, duration: float = 3.0,
                    size: tuple[int, int] = (64, 64), fps: int = 25, bad: tuple[str, ...] = tuple(BAD_CLIP_REASONS),
                    seed: int = 0) -> SyntheticAV:
    """Writes clips, an AudioSet-style manifest and class index.

    Clip ids look like AudioSet's ``<id>_<start>`` (``clip003_30.000``): they
    contain a dot. About a third of the clips carry two labels. The manifest
    lists the good clips first, then one clip of each ``bad`` kind
    (:data:`BAD_CLIP_REASONS`): ``missing`` (no file), ``corrupt`` (random
    bytes), ``truncated`` (the first half of a good file), ``short`` (a 1 s
    clip in a segment the manifest says is longer), ``no_audio`` (no audio
    track).

    Args:
        root: Output directory (``videos/``, ``manifest.csv``,
            ``class_index.csv``).
        num_clips: Good clips.
        num_classes: K.
        duration: Seconds per good clip.
        size: ``(height, width)`` of the clips.
        fps: Frame rate.
        bad: Bad kinds to add.
        seed: Seed of the label draw.

    Returns:
        Paths and expectations.
    """
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels: dict[str, tuple[int, ...]] = {}
    for i in range(num_clips):
        clip_id = f"clip{i:03d}_30.000"
        count = 2 if i % 3 == 2 and num_classes > 1 else 1
        labels[clip_id] = tuple(int(c) for c in rng.choice(num_classes, size=count, replace=False))
        make_clip(videos / f"{clip_id}.{'mkv' if i % 4 == 3 else 'mp4'}", labels[clip_id], num_classes,
                  duration, size, fps)
    bad_labels = {f"bad_{kind}_30.000": (0,) for kind in bad}
    for kind, clip_id in zip(bad, bad_labels):
        _make_bad_clip(kind, videos / f"{clip_id}.mp4", num_classes, duration, size, fps, rng)
    rows = [f'{clip_id}, 30.000, {30 + duration:.3f}, "{",".join(f"/m/syn{c}" for c in classes)}"'
            for clip_id, classes in {**labels, **bad_labels}.items()]
    manifest = root / "manifest.csv"
    manifest.write_text("# Segments csv created by hipscale.data.synthetic_media\n"
                        "# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join(rows) + "\n")
    class_index = root / "class_index.csv"
    class_index.write_text("index,mid,display_name\n"
                           + "".join(f'{c},/m/syn{c},"Tone {c}, {class_frequency(c):.0f} Hz"\n'
                                     for c in range(num_classes)))
    return SyntheticAV(videos, manifest, class_index, labels,
                       {clip_id: BAD_CLIP_REASONS[kind] for kind, clip_id in zip(bad, bad_labels)})


def make_image_folder(root: Path, num_classes: int = 3, per_class: int = 6, size: tuple[int, int] = (24, 32),
                      unreadable: bool = True, seed: int = 0) -> SyntheticImages:
    """Writes class-coloured noise images as PNG in an ImageFolder tree.

    Args:
        root: Tree root (``class_0/``, ``class_1/``, ...).
        num_classes: K.
        per_class: Good images per class.
        size: ``(height, width)``.
        unreadable: Also write ``class_0/broken.jpg`` holding random bytes.
        seed: Seed of the noise.

    Returns:
        The tree and its expectations.
    """
    rng = np.random.default_rng(seed)
    labels, bad = {}, {}
    for label in range(num_classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([255 * label // max(1, num_classes - 1), 128, 255 - 255 * label // max(1, num_classes - 1)])
        for i in range(per_class):
            noise = rng.integers(-40, 41, size=(*size, 3))
            Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
            labels[f"class_{label}/img_{i:03d}.png"] = label
    if unreadable:
        (root / "class_0" / "broken.jpg").write_bytes(rng.bytes(2000))
        bad["class_0/broken.jpg"] = "unreadable_image"
    return SyntheticImages(root, labels, bad)


def write_digits_imagefolder(root: Path, test_fraction: float = 0.25, seed: int = 0) -> dict[str, Path]:
    """Writes scikit-learn's digits (1,797 real 8x8 images) as ImageFolder trees.

    Pixel values 0..16 become grey levels ``round(v * 255 / 16)`` in 8-bit
    PNG files ``<split>/<digit>/<index>.png``; the split is stratified and
    seeded.

    Args:
        root: Output directory.
        test_fraction: Share of the test split.
        seed: Seed of the split.

    Returns:
        ``{"train": root/train, "test": root/test}``.
    """
    # scikit-learn is a test extra, not a dependency of the library.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=digits.target)
    splits = {"train": root / "train", "test": root / "test"}
    for split, members in (("train", train), ("test", test)):
        for index in members:
            folder = splits[split] / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            grey = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(grey).save(folder / f"{index:04d}.png")
    return splits


def _make_bad_clip(kind: str, path: Path, num_classes: int, duration: float, size: tuple[int, int], fps: int,
                   rng: np.random.Generator) -> None:
    if kind == "corrupt":
        path.write_bytes(rng.bytes(4000))
    elif kind == "truncated":
        make_clip(path, (0,), num_classes, duration, size, fps)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "short":
        make_clip(path, (0,), num_classes, 1.0, size, fps)
    elif kind == "no_audio":
        make_clip(path, (0,), num_classes, duration, size, fps, audio=False)
    elif kind != "missing":
        raise ValueError(f"unknown bad clip kind {kind!r}; expected one of {tuple(BAD_CLIP_REASONS)}")
