"""Which UNet configurations the design's network can be built with, as pure functions.

Checked both by `Unet` itself and by `ddpm_jax.config_validation` before
anything is built, so a bad config fails with the sizes that work.
"""
from typing import Optional, Sequence, Tuple, Union


def _as_hw(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def check_architecture(*, dim: int, dim_mults: Sequence[int], init_dim: Optional[int] = None,
                       with_time_emb: bool = True, resnet_block_groups: int = 8,
                       use_convnext: bool = True, dropout: float = 0.0,
                       num_classes: int = 0) -> None:
    """Raise ValueError for a configuration the design's network cannot be built with."""
    dim_mults = tuple(dim_mults)
    if not dim_mults or any(not isinstance(m, int) or m < 1 for m in dim_mults):
        raise ValueError(
            f"dim_mults must be a non-empty sequence of positive ints, got {dim_mults}")
    if dim_mults[0] != 1:
        raise ValueError(
            f"dim_mults[0] must be 1, got dim_mults={dim_mults}: the design's final block "
            f"takes the first level's dim * dim_mults[0] channels as exactly dim")
    if init_dim is None and dim < 3:
        raise ValueError(f"dim must be >= 3 so that init_dim = dim // 3 * 2 > 0, got dim={dim}")
    if init_dim is not None and init_dim < 1:
        raise ValueError(f"init_dim must be a positive int or None, got {init_dim}")
    if with_time_emb and (dim < 4 or dim % 2):
        raise ValueError(f"dim must be even and >= 4 for the sinusoidal time embedding "
                         f"(half of it are sines, half cosines), got dim={dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes < 0 or (num_classes and not with_time_emb):
        raise ValueError(f"num_classes must be 0 (unconditional) or positive with "
                         f"with_time_emb=True (the class embedding joins the time embedding), "
                         f"got num_classes={num_classes}, with_time_emb={with_time_emb}")
    if not use_convnext:
        channel_counts = sorted({dim * m for m in dim_mults})
        for channels in channel_counts:
            if channels % resnet_block_groups:
                divisors = [g for g in range(1, dim + 1) if dim % g == 0]
                raise ValueError(
                    f"resnet_block_groups={resnet_block_groups} does not divide {channels}, a "
                    f"channel count of the ResNet blocks' GroupNorm (dim={dim} times dim_mults="
                    f"{dim_mults}); with dim={dim} the groups that work are {divisors}, and "
                    f"with {resnet_block_groups} groups dim must be a multiple of "
                    f"{resnet_block_groups}")


def check_image_size(image_size: Union[int, Sequence[int]], dim_mults: Sequence[int]) -> None:
    """Raise ValueError unless each down stage can halve height and width exactly.

    The U-Net halves the image len(dim_mults) - 1 times and doubles it back, so
    both sides must be positive multiples of 2 ** (len(dim_mults) - 1).
    """
    height, width = _as_hw(image_size)
    factor = 2 ** (len(dim_mults) - 1)
    for side in (height, width):
        if side < 1 or side % factor:
            below, above = side // factor * factor, (side // factor + 1) * factor
            nearest = f"{below} or {above}" if below > 0 else f"{above}"
            raise ValueError(
                f"image size {height}x{width} does not fit dim_mults={tuple(dim_mults)}: "
                f"the network halves it {len(dim_mults) - 1} times, so height and width "
                f"must be multiples of {factor} (nearest to {side}: {nearest})")


def validate_unet_config(image_size: Union[int, Sequence[int]], *, dim: int,
                         dim_mults: Sequence[int] = (1, 2, 4, 8), init_dim: Optional[int] = None,
                         with_time_emb: bool = True, resnet_block_groups: int = 8,
                         use_convnext: bool = True, dropout: float = 0.0,
                         num_classes: int = 0) -> None:
    """Raise ValueError if `Unet(...)` cannot run on images of `image_size` (int or (H, W)).

    A pure function, for config validation without building the network.
    """
    check_architecture(dim=dim, dim_mults=dim_mults, init_dim=init_dim,
                       with_time_emb=with_time_emb, resnet_block_groups=resnet_block_groups,
                       use_convnext=use_convnext, dropout=dropout, num_classes=num_classes)
    check_image_size(image_size, dim_mults)
