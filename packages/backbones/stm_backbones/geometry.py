"""Stage geometry of the unified trunk, shared by the blocks whose layout depends on the input size.

The stem divides the image by 4 and each down-sampling layer by 2, rounding up (stride-2 convolutions with
padding 1): `stage_resolutions`. MetaArch builds the classification blocks for `nominal_resolutions(img_size)`,
(img // 4) // 2**i. Blocks with a fixed geometry (Swin's shift masks, PVT's position embeddings) take only
inputs whose stage resolutions are the nominal ones; `fixed_size_error` explains any other size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["fixed_size_error", "nominal_resolutions", "pair", "size_text", "stage_resolutions"]


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int or a pair."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def size_text(size: tuple[int, int]):
    """`224` for a square size, `(224, 320)` otherwise (how `img_size` is passed)."""
    return size[0] if size[0] == size[1] else size


def stage_resolutions(height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map sizes of the four stages for an input image: stem = ceil(/4), each downsample ceil(/2)."""
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    sizes = [(h, w)]
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def nominal_resolutions(img_size: int | Sequence[int]) -> list[tuple[int, int]]:
    """The stage resolutions MetaArch builds the blocks for: (img // 4) // 2**i."""
    height, width = pair(img_size)
    return [((height // 4) // 2**i, (width // 4) // 2**i) for i in range(4)]


def _listing(sizes: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sizes)


def fixed_size_error(height: int, width: int, img_size: int | Sequence[int], fixed: str, dense_alternative: str
                     ) -> str | None:
    """None when a `height` x `width` input gives the stage resolutions the model was built for, else the
    message: what is fixed (`fixed`, e.g. "its shift masks are fixed at construction"), and how to run the size
    (another img_size, padding to multiples of 32, or the dense backbone, which `dense_alternative`)."""
    built = pair(img_size)
    expected = nominal_resolutions(built)
    actual = stage_resolutions(height, width)
    if actual == expected:
        return None
    if stage_resolutions(*built) != expected:
        return (f"img_size={size_text(built)} gives stage resolutions {_listing(expected)} that no input produces "
                f"(a {height}x{width} input gives {_listing(actual)}): build it with an img_size whose sides are "
                "multiples of 32")
    message = (f"built for {built[0]}x{built[1]} inputs ({fixed}; stage resolutions {_listing(expected)}), "
               f"got {height}x{width}")
    if actual == nominal_resolutions((height, width)):
        return message + f"; pass img_size={size_text((height, width))} to timm.create_model to change it"
    rounded = tuple(32 * math.ceil(n / 32) for n in (height, width))
    return (message + f"; pad/resize the input to sides that are multiples of 32 and pass e.g. "
            f"img_size={size_text(rounded)} to timm.create_model, or use stm_backbones.create_dense_backbone, "
            f"which {dense_alternative}")
