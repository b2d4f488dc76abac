"""The classification app's GPU-only choices, tested on the CPU.

On a GPU the app picks the device and fp16 AMP by default, trains through a GradScaler, pins loader
memory and initialises NCCL; none of that runs on this project's CPU-only CI otherwise. Each test
drives the app's own functions with the GPU answer faked where only the answer matters
(torch.cuda.is_available, torch.distributed's init), and runs the GradScaler path for real: CPU
autocast supports float16 and GradScaler works on the CPU, so the skip-and-back-off of an fp16
overflow is the same code and arithmetic as on a GPU. `nox -s gpu_check` runs the real thing.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist
from cls_test_utils import MODEL

from stm_cls import dist_utils, engine, train


def _args(cls_main, *argv):
    return cls_main.get_args_parser().parse_args(["--model", MODEL, *argv])


@pytest.mark.parametrize("gpu", [True, False])
def test_default_device_and_amp_dtype(cls_main, monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    args = _args(cls_main)
    train.resolve_runtime_defaults(args)
    assert args.device == ("cuda" if gpu else "cpu")
    assert args.amp_dtype == ("float16" if gpu else "bfloat16")
    explicit = _args(cls_main, "--device", "cuda", "--amp_dtype", "bfloat16")
    train.resolve_runtime_defaults(explicit)
    assert (explicit.device, explicit.amp_dtype) == ("cuda", "bfloat16")


@pytest.mark.parametrize("use_amp,amp_dtype,enabled", [
    ("true", "float16", True), ("true", "bfloat16", False), ("false", "float16", False)])
def test_grad_scaler_only_for_float16_amp(cls_main, use_amp, amp_dtype, enabled):
    args = _args(cls_main, "--use_amp", use_amp, "--amp_dtype", amp_dtype)
    assert train.make_scaler(args, torch.device("cpu")).is_enabled() is enabled


def _tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    g = torch.Generator().manual_seed(seed)
    loader = [(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, loader, optimizer


def _epoch(model, loader, optimizer, scaler):
    return engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, optimizer, torch.device("cpu"), 0,
                                  scaler=scaler, iters_per_epoch=len(loader), use_amp=True,
                                  amp_dtype=torch.float16, clip_grad=1.0, print_freq=1000)


def test_fp16_grad_scaler_steps_and_reports_its_scale():
    model, loader, optimizer = _tiny_setup()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stats = _epoch(model, loader, optimizer, scaler)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # the steps were taken
    assert scaler.get_scale() == 2.0**10  # no overflow, growth only after 2000 clean steps
    assert stats["loss_scale"] == 2.0**10  # logged (gpu_check reads it from log.txt)
    # Unscaling before the clip: the same update as plain float16 autocast without a scaler.
    ref_model, _, ref_opt = _tiny_setup()
    _epoch(ref_model, loader, ref_opt, torch.amp.GradScaler("cpu", enabled=False))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_fp16_overflow_skips_the_step_and_backs_off_the_scale():
    """A scale so large that the scaled gradients overflow (what fp16 training meets on a GPU):
    the optimizer step is skipped, the weights are untouched, the scale halves each time, and the
    loss itself (unscaled, finite) does not stop training."""
    model, loader, optimizer = _tiny_setup()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    stats = _epoch(model, loader, optimizer, scaler)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() == pytest.approx(3e38 / 4)  # two skipped steps
    assert stats["loss_scale"] == pytest.approx((3e38 / 2 + 3e38 / 4) / 2)


@pytest.mark.parametrize("device,pin_mem,pinned", [("cuda", "true", True), ("cuda:1", "true", True),
                                                   ("cpu", "true", False), ("cuda", "false", False)])
def test_pin_memory_only_on_cuda(cls_main, device, pin_mem, pinned):
    args = _args(cls_main, "--device", device, "--pin_mem", pin_mem, "--num_workers", "0", "--batch_size", "4")
    data = torch.utils.data.TensorDataset(torch.zeros(8, 3, 4, 4), torch.zeros(8, dtype=torch.long))
    _, train_loader, val_loader = train.build_loaders(args, data, data)
    assert train_loader.pin_memory is pinned and val_loader.pin_memory is pinned


@pytest.mark.parametrize("gpu", [True, False])
def test_distributed_backend_nccl_on_gpus_gloo_on_cpus(monkeypatch, gpu):
    """torchrun's environment for rank 1 of 2: NCCL, the local GPU and cuda:LOCAL_RANK on a GPU
    machine; gloo and the CPU otherwise."""
    for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(key, value)
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    args = argparse.Namespace(device="cuda" if gpu else "cpu", dist_url="env://", dist_on_itp=False)
    try:
        dist_utils.init_distributed(args)
    finally:
        dist_utils.cleanup_distributed()  # restores print (rank 1 silences stdout)
    assert args.distributed and (args.rank, args.world_size, args.gpu) == (1, 2, 1)
    assert calls["init"]["backend"] == args.dist_backend == ("nccl" if gpu else "gloo")
    assert (calls["init"]["rank"], calls["init"]["world_size"]) == (1, 2)
    if gpu:
        assert args.device == "cuda:1" and calls["set_device"] == 1
    else:
        assert args.device == "cpu" and "set_device" not in calls


@pytest.fixture
def _restore_backends():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_backend_settings_only_on_cuda(_restore_backends):
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    train.configure_cuda_backends(torch.device("cpu"))
    assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32)
    train.configure_cuda_backends(torch.device("cuda", 0))  # only flags: no device is touched
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


class _FakeDDP(torch.nn.Module):
    def __init__(self, module, device_ids=None, find_unused_parameters=False):
        super().__init__()
        self.module, self.device_ids = module, device_ids


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_distributed_wrapping(device, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    args = argparse.Namespace(distributed=False, gpu=1)
    assert train.wrap_distributed(model, args, torch.device(device), ddp=_FakeDDP) == (model, model)
    args.distributed = True
    wrapped, plain = train.wrap_distributed(model, args, torch.device(device), ddp=_FakeDDP)
    assert isinstance(wrapped, _FakeDDP) and wrapped.module is plain
    norms = [type(m) for m in plain.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if device == "cuda":  # SyncBatchNorm before DDP, which gets this process's GPU
        assert norms == [torch.nn.SyncBatchNorm] and wrapped.device_ids == [1]
    else:  # no SyncBatchNorm kernel on the CPU: plain BatchNorm, said once
        assert norms == [torch.nn.BatchNorm2d] and wrapped.device_ids is None
        assert "SyncBatchNorm needs CUDA" in capsys.readouterr().out
