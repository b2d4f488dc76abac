"""One module per model family; importing them registers the models with timm."""

from . import convnext  # noqa: F401
# (each family module adds its import line below)
