"""Multi-process runs: torchrun on CPU (gloo), sharded evaluation, launcher environment parsing."""

from __future__ import annotations

import re
import subprocess
import sys

from cls_test_utils import FAST_ARGS, MAIN_PY, NO_AUG_ARGS, REPO_ROOT, read_log, subprocess_env

from stm_cls.checkpoint import load_file
from stm_cls.datasets import ShardedEvalSampler
from stm_cls.dist_utils import detect_launch_env, first_slurm_host


def test_sharded_eval_sampler_covers_each_index_once():
    data = list(range(15))
    shards = [list(ShardedEvalSampler(data, 4, r)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == data
    assert [len(s) for s in shards] == [4, 4, 4, 3]


def test_launch_env_detection():
    assert detect_launch_env(environ={}) is None
    assert detect_launch_env(environ={"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: not distributed
    torchrun = detect_launch_env(environ={"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert torchrun == {"rank": 3, "world_size": 8, "local_rank": 1}
    slurm = detect_launch_env(environ={"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
                                       "SLURM_NODELIST": "gpu[012-013]"})
    assert slurm["rank"] == 5 and slurm["world_size"] == 8 and slurm["local_rank"] == 1
    assert slurm["master_addr"] == "gpu012"
    assert first_slurm_host("node7,node9") == "node7"
    assert first_slurm_host("a[1,3-4],b2") == "a1"
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect_launch_env(dist_on_itp=True, environ=ompi)["rank"] == 1
    assert detect_launch_env(dist_on_itp=False, environ=ompi) is None


def test_torchrun_two_processes_and_distributed_eval_matches_single(cls_main, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "ddp"
    args = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", tiny_dataset, "--output_dir", out, "--epochs", "2",
            "--batch_size", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(MAIN_PY),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(1), cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "distributed init (rank 1/2" in proc.stdout + proc.stderr
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[-1]["test_num_images"] == 15  # 8 + 7 images: nothing padded or counted twice
    ckpt = load_file(out / "checkpoint-1.pth")
    assert len(ckpt["rng_states"]) == 2

    capsys.readouterr()
    assert cls_main.main([*map(str, args[:-4]), "--eval", "true", "--resume", str(out / "checkpoint-1.pth")]) == 0
    single = [float(a) for a in re.findall(r"\* Acc@1 ([0-9.]+)", capsys.readouterr().out)]
    assert len(single) == 1 and abs(single[0] - log[-1]["test_acc1"]) < 1e-3, (single, log[-1]["test_acc1"])
