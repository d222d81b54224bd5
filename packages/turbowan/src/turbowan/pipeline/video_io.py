"""Write and read video files: mp4 (H.264, yuv420p), webm (VP9) and looping gif.

PyAV writes the frames at exactly the size they have (no silent resize, unlike
imageio-ffmpeg's macro-block rounding). Every file is written to a temporary name in the
target directory and renamed into place only when complete, so an interrupted or failed run
never leaves a half-written video under the requested name.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

DEFAULT_FPS = 16  # the rate Wan2.x was trained at; 24 fps plays about 1.5x too fast
DEFAULT_QUALITY = 8  # 1 (smallest file) .. 10 (near lossless)
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")


@dataclass(frozen=True)
class VideoFile:
    """Frames read back from a file: uint8 (F, H, W, 3) and the stored frame rate."""

    frames: np.ndarray
    fps: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate a video output path before any work: known suffix, writable directory."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"output {str(path)!r}: unknown video extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(VIDEO_SUFFIXES)} (e.g. -o out/video.mp4)"
        )
    if path.exists() and path.is_dir():
        raise ValueError(f"output {str(path)!r} is a directory; give a file name such as {path / 'video.mp4'}")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():  # the directory will be created: check its first existing ancestor
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"output {str(path)!r}: {str(probe)!r} is a file, not a directory; choose another output path"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"output {str(path)!r}: directory {str(probe)!r} is not writable; "
            "choose an output path in a directory you can write to"
        )
    return path


def check_quality(quality: int) -> None:
    if not isinstance(quality, int) or not 1 <= quality <= 10:
        raise ValueError(f"quality must be an integer from 1 to 10 (default {DEFAULT_QUALITY}), got {quality!r}")


def check_fps(fps: float) -> None:
    if not (isinstance(fps, (int, float)) and 0 < fps <= 240):
        raise ValueError(f"fps must be a number in (0, 240] (default {DEFAULT_FPS}), got {fps!r}")


def check_frame_size(fmt: str, width: int, height: int) -> None:
    """mp4 stores yuv420p (chroma at half size), so both sides must be even."""
    if fmt == "mp4" and (width % 2 or height % 2):
        raise ValueError(
            f"mp4 needs an even width and height (H.264 yuv420p), got {width}x{height}; "
            "use webm or gif, or an even size"
        )


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) or (1, 3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3), clamped and rounded."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"write one video at a time; got a batch of {video.shape[0]}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, F, H, W) video, got {tuple(video.shape)}")
    scaled = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return scaled.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _as_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}; "
            "convert a [-1, 1] video with to_uint8_frames()"
        )
    if frames.shape[0] == 0:
        raise ValueError("no frames to write")
    return np.ascontiguousarray(frames)


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _write_av(frames: np.ndarray, target: str, fmt: str, fps: float, quality: int) -> None:
    import av

    height, width = frames.shape[1:3]
    check_frame_size(fmt, width, height)
    if fmt == "mp4":
        codec, pix_fmt = "libx264", "yuv420p"
        options = {"crf": str(round(40 - 3 * quality)), "preset": "medium"}
    else:
        codec, pix_fmt = "libvpx-vp9", "yuv420p"
        options = {"crf": str(round(60 - 5 * quality)), "b": "0", "row-mt": "1"}
    with av.open(target, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=_fps_fraction(fps), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for array in frames:
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(frames: np.ndarray, target: str, fps: float) -> None:
    # Pillow builds an adaptive palette per frame; ffmpeg's encoder would need a palette
    # filter graph for the same quality. Loops forever (loop=0).
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    duration_ms = max(int(round(1000.0 / fps)), 10)
    images[0].save(
        target, format="GIF", save_all=True, append_images=images[1:], loop=0,
        duration=duration_ms, optimize=False,
    )


def _new_file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (usually 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_video(
    frames: np.ndarray | torch.Tensor,
    path: str | os.PathLike[str],
    *,
    fps: float = DEFAULT_FPS,
    quality: int = DEFAULT_QUALITY,
) -> Path:
    """Write uint8 (F, H, W, 3) frames; the format follows the suffix (.mp4, .webm, .gif)."""
    path = check_output_path(path)
    check_fps(fps)
    check_quality(quality)
    frames = _as_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial" + suffix)
    os.close(fd)
    try:
        if suffix == ".gif":
            _write_gif(frames, tmp, fps)
        else:
            _write_av(frames, tmp, suffix[1:], fps, quality)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; a video should be like any file
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the partial file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_video(path: str | os.PathLike[str]) -> VideoFile:
    """Decode every frame of a video file to uint8 RGB (for tests and `turbowan decode` checks)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return VideoFile(frames=np.stack(frames), fps=float(rate))
