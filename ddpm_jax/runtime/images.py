"""Image grids (PNG) and the denoising animation (GIF) of NHWC images in [-1, 1], with Pillow.

The grid is laid out as torchvision's `make_grid`/`save_image` (which the
design uses): `ncol = min(nrow, N)` images per row, `ceil(N / ncol)` rows,
`padding` black pixels around and between images, so the picture is
    width  = ncol * (W + padding) + padding
    height = nrows * (H + padding) + padding
pixels (`grid_size`). One channel gives a grayscale picture, three give RGB.
Files are written through `ddpm_jax.runtime.storage` (local paths or `gs://`), their
directory created.
"""
import math
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ddpm_jax.runtime import storage

CHANNELS = (1, 3)


def to_uint8(images) -> np.ndarray:
    """Pixels in [-1, 1] -> uint8 [0, 255]: (x + 1) / 2 * 255, clipped, rounded to nearest."""
    scaled = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def grid_size(num_images: int, height: int, width: int, nrow: int,
              padding: int = 2) -> Tuple[int, int]:
    """(height, width) in pixels of the grid `make_grid` builds."""
    ncol = min(nrow, num_images)
    nrows = math.ceil(num_images / ncol)
    return nrows * (height + padding) + padding, ncol * (width + padding) + padding


def make_grid(images, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] -> one uint8 picture [grid_h, grid_w, C], row-major."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in CHANNELS or images.shape[0] < 1:
        raise ValueError(f"images must be NHWC [N >= 1, H, W, C] with C in {CHANNELS}, "
                         f"got shape {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    num, height, width, channels = images.shape
    ncol = min(nrow, num)
    grid = np.zeros((*grid_size(num, height, width, nrow, padding), channels), np.uint8)
    for i, image in enumerate(to_uint8(images)):
        top = (i // ncol) * (height + padding) + padding
        left = (i % ncol) * (width + padding) + padding
        grid[top:top + height, left:left + width] = image
    return grid


def _picture(grid: np.ndarray) -> Image.Image:
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_png(picture: np.ndarray, path: storage.PathLike) -> None:
    """Write a uint8 [H, W, C] picture (e.g. from `make_grid`), C in (1, 3), as a PNG."""
    picture = np.asarray(picture)
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[-1] not in CHANNELS:
        raise ValueError(f"picture must be uint8 [H, W, C] with C in {CHANNELS}, got "
                         f"{picture.dtype} {picture.shape}")
    storage.write_encoded(path, lambda f: _picture(picture).save(f, format="PNG"))


def save_grid(images, path: storage.PathLike, nrow: int = 8, padding: int = 2) -> Tuple[int, int]:
    """Write images [N, H, W, C] in [-1, 1] as one PNG grid; returns its (height, width)."""
    grid = make_grid(images, nrow, padding)
    save_png(grid, path)
    return grid.shape[:2]


def save_gif(trajectory, path: storage.PathLike, nrow: Optional[int] = None, padding: int = 2,
             frame_ms: int = 50, final_frame_ms: int = 1000) -> int:
    """Write the denoising animation of trajectory [F, K, H, W, C] (the images after each step).

    Frame f is the grid (see `make_grid`; nrow default: ceil(sqrt(K))) of the
    K images at step f (`sampling.generate` keeps every step or evenly spaced
    ones). Frames last `frame_ms`, the last one `final_frame_ms` (the design's
    interval of 50 ms and repeat delay of 1 s); the GIF loops. Returns the
    number of frames given to Pillow, which merges a frame identical to the
    previous one (the same animation, one frame fewer).
    """
    trajectory = np.asarray(trajectory)
    if trajectory.ndim != 5:
        raise ValueError(f"trajectory must be [frames, images, H, W, C], got shape "
                         f"{trajectory.shape}")
    nrow = math.ceil(math.sqrt(trajectory.shape[1])) if nrow is None else nrow
    frames = [_picture(make_grid(step_images, nrow, padding)) for step_images in trajectory]
    durations = [frame_ms] * (len(frames) - 1) + [final_frame_ms]
    storage.write_encoded(path, lambda f: frames[0].save(
        f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0))
    return len(frames)
