"""The training window of a stored audio/video clip: a random run of frames (and the audio of the same span)
during training, the centre one for evaluation and prediction.

Stored video is [T, H, W, 3] frames evenly spaced over the clip's W seconds (each frame stands for a W / T
slice), stored audio [S] samples of the same W seconds. A window of w seconds keeps T' = w T / W consecutive
frames and the S T' / T samples of their slices, so the two modalities stay aligned; audio without video is
cut at any sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch


@dataclass(frozen=True)
class ClipWindow:
    """Sizes of the stored clip and of the window, per modality (None where the modality is absent).

    Attributes:
        stored_frames, window_frames: T and T'.
        stored_samples, window_samples: S and S'.
    """

    stored_frames: Optional[int]
    window_frames: Optional[int]
    stored_samples: Optional[int]
    window_samples: Optional[int]

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, ...]], stored_seconds: Optional[float],
              seconds: float) -> "ClipWindow":
        """The window of `seconds` in clips of `stored_seconds` with stored `shapes` ({"video": [T, H, W, 3],
        "audio": [S]}).

        Raises:
            ValueError: no audio/video, an unknown clip length, a window longer than the clip, or one that
                does not cover a whole number of frames.
        """
        if "video" not in shapes and "audio" not in shapes:
            raise ValueError("a clip window needs video or audio shards (these hold " + ", ".join(shapes) + ")")
        if not stored_seconds:
            raise ValueError("the shards' index.json does not say how long their clips are (window_seconds)")
        if seconds > stored_seconds + 1e-9:
            raise ValueError(f"{seconds} s is longer than the {stored_seconds} s clips the shards hold")
        frames = window_frames = samples = window_samples = None
        if "video" in shapes:
            frames = shapes["video"][0]
            exact = seconds * frames / stored_seconds
            window_frames = round(exact)
            if abs(exact - window_frames) > 1e-6 or window_frames < 1:
                raise ValueError(f"{seconds} s is not a whole number of the stored frames ({frames} frames over "
                                 f"{stored_seconds} s, one every {stored_seconds / frames:g} s)")
        if "audio" in shapes:
            samples = shapes["audio"][0]
            if frames is not None:
                if samples % frames:
                    raise ValueError(f"{samples} audio samples do not split evenly over {frames} frames")
                window_samples = samples // frames * window_frames
            else:
                window_samples = round(seconds * samples / stored_seconds)
        return cls(frames, window_frames, samples, window_samples)

    def model_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The stored shapes with the window's frame and sample counts."""
        out = dict(shapes)
        if self.window_frames is not None:
            out["video"] = (self.window_frames, *shapes["video"][1:])
        if self.window_samples is not None:
            out["audio"] = (self.window_samples, *shapes["audio"][1:])
        return out

    def offsets(self, batch_size: int, device: torch.device,
                generator: Optional[torch.Generator]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(first frame [B], first audio sample [B]) of each sample's window: random with a generator, else
        the centre."""
        if self.stored_frames is not None:
            room = self.stored_frames - self.window_frames
            frames = (torch.randint(0, room + 1, (batch_size,), generator=generator, device=device)
                      if generator is not None else torch.full((batch_size,), room // 2, device=device))
            samples = frames * (self.stored_samples // self.stored_frames) if self.stored_samples else None
            return frames, samples
        room = self.stored_samples - self.window_samples
        samples = (torch.randint(0, room + 1, (batch_size,), generator=generator, device=device)
                   if generator is not None else torch.full((batch_size,), room // 2, device=device))
        return None, samples

    def crop(self, inputs: Mapping[str, torch.Tensor], generator: Optional[torch.Generator]) -> dict[str, torch.Tensor]:
        """{"video": [B, T*H*W, 3], "audio": [B, S, 1], ...} -> the windows [B, T'*H*W, 3], [B, S', 1]."""
        out = dict(inputs)
        any_input = next(iter(inputs.values()))
        frames, samples = self.offsets(any_input.shape[0], any_input.device, generator)
        if frames is not None:
            video = inputs["video"]
            b, _, c = video.shape
            per_frame = video.shape[1] // self.stored_frames
            index = frames[:, None] + torch.arange(self.window_frames, device=video.device)      # [B, T']
            picked = torch.gather(video.view(b, self.stored_frames, per_frame, c), 1,
                                  index[:, :, None, None].expand(-1, -1, per_frame, c))
            out["video"] = picked.reshape(b, self.window_frames * per_frame, c)
        if samples is not None:
            audio = inputs["audio"]
            index = samples[:, None] + torch.arange(self.window_samples, device=audio.device)    # [B, S']
            out["audio"] = torch.gather(audio, 1, index[:, :, None].expand(-1, -1, audio.shape[2]))
        return out
