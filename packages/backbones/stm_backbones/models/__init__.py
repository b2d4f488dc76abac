"""One module per model family; importing them registers the models with timm."""

# (each family module adds its import line below)
from . import (  # noqa: F401  # noqa: F401
    convnext,  # noqa: F401
    dcn_v3,
    halo,
    pvt,
    swin,
)
