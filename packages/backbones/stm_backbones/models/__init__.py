"""One module per model family; importing them registers the models with timm.

The import order is the registration order of `stm_backbones.list_families()`: the study's order.
"""

from . import halo, pvt, swin, convnext, dcn_v3  # noqa: F401, I001
