"""Output sizes: the upstream resolution table (spec §8.1) or an explicit width/height."""

from __future__ import annotations

from turbowan.limits import check_frames_bound, check_size_bound

# (width, height) per resolution key and aspect ratio (W:H); every entry is a multiple of 16.
VIDEO_RES_SIZE_INFO: dict[str, dict[str, tuple[int, int]]] = {
    "480": {"16:9": (768, 432), "9:16": (432, 768), "4:3": (640, 480), "3:4": (480, 640), "1:1": (480, 480)},
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "4:3": (640, 480), "3:4": (480, 640), "1:1": (640, 640)},
    "512": {"16:9": (640, 384), "9:16": (384, 640), "4:3": (640, 512), "3:4": (512, 640), "1:1": (512, 512)},
    "720": {"16:9": (1280, 704), "9:16": (704, 1280), "4:3": (960, 704), "3:4": (704, 960), "1:1": (960, 960)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "4:3": (960, 720), "3:4": (720, 960), "1:1": (960, 960)},
}
RESOLUTIONS = tuple(VIDEO_RES_SIZE_INFO)
ASPECT_RATIOS = ("16:9", "9:16", "4:3", "3:4", "1:1")
SIZE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2
DEFAULT_RESOLUTION = "720p"  # upstream I2V default
DEFAULT_ASPECT_RATIO = "16:9"


def _check_multiple(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
        lower = max(SIZE_MULTIPLE, (int(value) // SIZE_MULTIPLE) * SIZE_MULTIPLE) if isinstance(value, int) else SIZE_MULTIPLE
        raise ValueError(
            f"{name} must be a positive multiple of {SIZE_MULTIPLE} (VAE stride 8 x patch 2), "
            f"got {value!r}; try {lower} or {lower + SIZE_MULTIPLE}"
        )


def resolve_size(
    resolution: str | None = None,
    aspect_ratio: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> tuple[int, int]:
    """(width, height) from explicit sizes (both or neither) or the resolution table."""
    if (width is None) != (height is None):
        raise ValueError("give both --width and --height, or neither (then --resolution/--aspect-ratio apply)")
    if width is not None and height is not None:
        _check_multiple("width", width)
        _check_multiple("height", height)
        check_size_bound(width, height)
        return width, height
    resolution = DEFAULT_RESOLUTION if resolution is None else str(resolution)
    aspect_ratio = DEFAULT_ASPECT_RATIO if aspect_ratio is None else str(aspect_ratio)
    if resolution not in VIDEO_RES_SIZE_INFO:
        raise ValueError(
            f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)} "
            "or give --width and --height"
        )
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(
            f"unknown aspect ratio {aspect_ratio!r}; choose one of {', '.join(ASPECT_RATIOS)} (width:height)"
        )
    return VIDEO_RES_SIZE_INFO[resolution][aspect_ratio]


def check_frames(frames: int) -> int:
    """The causal VAE needs 4n+1 frames (1 + 4 per latent frame)."""
    if not isinstance(frames, int) or frames < 1 or frames % 4 != 1:
        if isinstance(frames, int) and frames >= 1:
            below = frames - (frames - 1) % 4
            hint = f"try {below} or {below + 4}" if below >= 1 else "try 5"
        else:
            hint = "try 81 (upstream default) or 17"
        raise ValueError(f"frames must be 4n+1 (1, 5, 9, ..., 81), got {frames!r}; {hint}")
    check_frames_bound(frames)
    return frames


def latent_shape(frames: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(16, T, H/8, W/8) for a clip of ``frames`` frames."""
    check_frames(frames)
    return 16, 1 + (frames - 1) // 4, height // 8, width // 8
