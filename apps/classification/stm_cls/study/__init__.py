"""The study runner behind ``apps/classification/study.py``: train every model under one recipe, evaluate,
analyse, and write the comparison report.

``runner`` holds the steps and their state file (what makes a killed study resume where it stopped) and
the launchers (local processes, torchrun, submitit's SLURM or local executors); ``report`` turns the
results into ``report.md``, ``report.html`` and ``study.json``; ``reported`` holds the study's own
published figures, placed beside ours.
"""
