"""The study's analyses of classification models, run by ``apps/classification/analyze.py``.

One module per analysis (``invariance``, ``erf``, ``robustness``, ``cost``), each with ``run`` (the
measurement, sharded over ``torchrun`` processes with exact results), ``csv_rows`` and ``plot``;
``common`` holds model/checkpoint loading, the evaluation images, the batch-preserving sharding and
atomic output files. The protocols are in each module's docstring and in
``apps/classification/ANALYSES.md``.
"""

ANALYSES = ("invariance", "erf", "robustness", "cost")
