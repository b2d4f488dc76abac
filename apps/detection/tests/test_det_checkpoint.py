"""Crash-safe detection checkpoints (issue 11, item 2): a write stopped at any moment leaves the previous
file intact, --resume skips an empty / truncated / unloadable file named by `last_checkpoint` with a warning
and falls back to the newest good one, resuming after the final iteration leaves a loadable
model_final.pth, and nothing is ever unpickled beyond weights."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from det_test_utils import APP_DIR, DEMO_CONFIG, SMALL_OVERRIDES, TRAIN_NET, half_writing_save, run_train_net

from stm_det.checkpoint import AtomicCheckpointer, CheckpointError, load_weights_only


def _checkpointer(save_dir, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, AtomicCheckpointer(model, str(save_dir), optimizer=optimizer)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    ckpt.save("model_final", iteration=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def stop():
        raise KeyboardInterrupt  # what a Ctrl-C in the middle of torch.save raises

    monkeypatch.setattr(torch, "save", half_writing_save(stop))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_final", iteration=3)
    monkeypatch.undo()
    old = load_weights_only(str(tmp_path / "model_final.pth"))
    assert old["iteration"] == 1
    assert all(torch.equal(old["model"][k], before[k]) for k in before)
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_final.pth"]  # no temp
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path):  # the permissions a plain open() gives, not a temp file's 0o600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_kill_during_write_keeps_the_previous_file(tmp_path):
    """os._exit in the middle of the write (as kill -9 would stop it): the old file and the pointer
    survive, only an ignored temp file is left, and a resume reads the old checkpoint."""
    script = tmp_path / "kill_mid_write.py"
    tmp_path = tmp_path / "output"
    tmp_path.mkdir()
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(APP_DIR)!r})
        sys.path.insert(0, {str(APP_DIR / "tests")!r})
        import torch
        from det_test_utils import half_writing_save
        from test_det_checkpoint import _checkpointer
        model, ckpt = _checkpointer({str(tmp_path)!r})
        ckpt.save("model_0000001", iteration=1)
        with torch.no_grad():
            model.weight.add_(1.0)
        torch.save = half_writing_save(lambda: os._exit(137))
        ckpt.save("model_0000003", iteration=3)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 137, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path))
    assert "model_0000003.pth" not in names and "model_0000001.pth" in names
    assert [n for n in names if n.startswith(".model_0000003.pth.")]  # the half-written temp file
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    model, ckpt = _checkpointer(tmp_path, seed=1)
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # the temp file is cleaned up
    ref, _ = _checkpointer(tmp_path)  # seed 0: the weights that were saved at iteration 1
    assert torch.equal(model.weight, ref.weight)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_resume_skips_a_damaged_pointer_target(tmp_path, caplog, damage):
    _, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    ckpt.save("model_0000003", iteration=3)
    target = tmp_path / "model_0000003.pth"
    data = target.read_bytes()
    target.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00not a zip" * 50}[damage])
    _, ckpt = _checkpointer(tmp_path, seed=1)
    with caplog.at_level(logging.WARNING):
        extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(target) in w and "Skipping" in w for w in warnings), warnings
    assert any(str(tmp_path / "model_0000001.pth") in w for w in warnings), warnings


def test_resume_without_a_usable_pointer_takes_the_newest_file(tmp_path, caplog):
    _, ckpt = _checkpointer(tmp_path)
    for it in (1, 3, 5):
        ckpt.save(f"model_{it:07d}", iteration=it)
    for pointer in ("", "../../etc/passwd", "model_0000009.pth"):
        (tmp_path / "last_checkpoint").write_text(pointer)
        _, ckpt = _checkpointer(tmp_path, seed=1)
        assert ckpt.resume_or_load("", resume=True)["iteration"] == 5, pointer
    (tmp_path / "last_checkpoint").unlink()
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 5


def test_resume_with_no_loadable_file_is_an_error(tmp_path):
    _, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no loadable checkpoint in"):
        ckpt.resume_or_load("", resume=True)


def test_crafted_pickle_is_refused(tmp_path):
    """A checkpoint whose unpickling would run a command is refused, naming the type; it never runs."""
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model, ckpt = _checkpointer(tmp_path)
    torch.save({"model": model.state_dict(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to load: it contains '(posix|os)\.system'"):
        ckpt.load(str(tmp_path / "evil.pth"))
    (tmp_path / "model.pkl").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="model.pkl: pickled model-zoo files are not loaded"):
        ckpt.load(str(tmp_path / "model.pkl"))
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint not found"):
        ckpt.load(str(tmp_path / "nope.pth"))
    # As the newest checkpoint of a folder, it is skipped by --resume like any unloadable file.
    ckpt.save("model_0000001", iteration=1)
    os.replace(tmp_path / "evil.pth", tmp_path / "model_final.pth")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 1
    assert not marker.exists()


def test_best_checkpoint_does_not_move_the_pointer(tmp_path):
    _, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000003", iteration=3)
    ckpt.save("model_best", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert load_weights_only(str(tmp_path / "model_best.pth"))["iteration"] == 1


# --------------------------------------------------------------------------------------------------
# train_net.py end to end
# --------------------------------------------------------------------------------------------------

TINY = [
    *SMALL_OVERRIDES,
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0005", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
    "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "TEST.VIS_IMAGES", "0", "LOG_PERIOD", "1",
]


@pytest.mark.slow
def test_train_net_kill_while_writing_model_final_then_resume(tmp_path, shapes_root):
    """The issue's case: a kill while model_final.pth is written. --resume then finds the training
    finished (model_0000001.pth, the last iteration, is the newest checkpoint) and writes a loadable
    model_final.pth. Then the same after model_final.pth itself is truncated (the pointer names it):
    a warning names it, and it is rewritten from the newest good checkpoint."""
    out = tmp_path / "out"
    driver = tmp_path / "train_and_die.py"
    driver.write_text(textwrap.dedent(f"""
        import os, runpy, sys
        sys.path.insert(0, {str(APP_DIR / "tests")!r})
        import torch
        from det_test_utils import half_writing_save
        real_save, half = torch.save, half_writing_save(lambda: os._exit(137))

        def save(obj, f, *args, **kwargs):
            name = os.path.basename(str(getattr(f, "name", f)))
            return (half if "model_final.pth" in name else real_save)(obj, f, *args, **kwargs)

        torch.save = save
        sys.argv = [{str(TRAIN_NET)!r}, *sys.argv[1:]]
        runpy.run_path({str(TRAIN_NET)!r}, run_name="__main__")
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = ["--config-file", str(DEMO_CONFIG), *TINY, "OUTPUT_DIR", str(out)]
    proc = subprocess.run([sys.executable, str(driver), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert not (out / "model_final.pth").exists()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"

    proc = run_train_net(["--config-file", DEMO_CONFIG, "--resume", *TINY, "OUTPUT_DIR", out], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 2" in proc.stderr + proc.stdout
    final = load_weights_only(str(out / "model_final.pth"))
    assert final["iteration"] == 1
    weights = load_weights_only(str(out / "model_0000001.pth"))["model"]
    assert all(torch.equal(final["model"][k], v) for k, v in weights.items())
    assert (out / "last_checkpoint").read_text() == "model_final.pth"

    data = (out / "model_final.pth").read_bytes()
    (out / "model_final.pth").write_bytes(data[: len(data) // 3])
    proc = run_train_net(["--config-file", DEMO_CONFIG, "--resume", *TINY, "OUTPUT_DIR", out], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"Skipping a checkpoint on resume: {out / 'model_final.pth'}" in log
    assert load_weights_only(str(out / "model_final.pth"))["iteration"] == 1
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
