"""Image-classification training app for the unified spatial-token-mixer backbones.

The command-line entry point is ``apps/classification/main.py``; the modules here hold the pieces
(data, optimisation, training loop, checkpoints, distributed helpers) so that tests can import them.
"""
