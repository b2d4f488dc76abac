"""Submit apps/classification/main.py to SLURM with submitit (one task per GPU, requeued on preemption).

    .venv/bin/python apps/classification/submitit_train.py --nodes 2 --partition gpu -- \
        --model unified_swin_tiny --data_path /data/imagenet --output_dir output/swin_tiny

Arguments after ``--`` go to main.py unchanged. Resumption after preemption/timeout relies on
main.py's --auto_resume (the newest complete checkpoint in --output_dir).
"""

from __future__ import annotations

import argparse
import os
import sys

APP_DIR = os.path.dirname(os.path.abspath(__file__))


class Trainer:
    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> int:
        sys.path.insert(0, APP_DIR)
        import submitit

        env = submitit.JobEnvironment()
        # main.py's launcher detection reads SLURM_* itself; only the rendezvous port needs a default.
        os.environ.setdefault("MASTER_PORT", "22110")
        print(f"task {env.global_rank}/{env.num_tasks} on {env.hostname}", flush=True)
        from main import main

        code = main(self.argv)
        if code:
            raise RuntimeError(f"main.py exited with code {code}")  # mark the submitit job as failed
        return code

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.argv))  # requeue; --auto_resume continues


def parse() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    train_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser("submitit launcher for the classification app")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--cpus_per_task", type=int, default=10)
    p.add_argument("--timeout_min", type=int, default=72 * 60)
    p.add_argument("--partition", default=None)
    p.add_argument("--job_dir", default="output/submitit/%j")
    return p.parse_args(own), train_argv


def submit() -> None:
    import submitit

    opts, train_argv = parse()
    executor = submitit.AutoExecutor(folder=opts.job_dir, slurm_max_num_timeout=30)
    extra = {"slurm_partition": opts.partition} if opts.partition else {}
    executor.update_parameters(nodes=opts.nodes, tasks_per_node=opts.gpus_per_node, gpus_per_node=opts.gpus_per_node,
                               cpus_per_task=opts.cpus_per_task, timeout_min=opts.timeout_min, name="stm-cls",
                               **extra)
    job = executor.submit(Trainer(train_argv))
    print(f"submitted job {job.job_id}; logs in {opts.job_dir}")


if __name__ == "__main__":
    submit()
