"""Workspace sessions: `nox -s build_ops test` builds the deformable op and runs every test.

All sessions share ONE virtual environment (``.venv`` in the repository root, or ``$STM_VENV``),
because torch alone is ~5.5 GB: nox's per-session environments would install it once per session.
The environment is (re)synchronised only when one of the files that define it changes; a stamp
file inside the environment records their hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("STM_VENV", ROOT / ".venv")).resolve()
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".stm-env-stamp"
# Every file whose content defines what the environment holds.
ENV_FILES = [
    "requirements.txt",
    "packages/backbones/pyproject.toml",
    "third_party/detectron2/build_wheel.py",
    "third_party/detectron2/detectron2-0.6.patch",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "third_party/detectron2/overlay").rglob("*.py")),
]
TEST_PATHS = ["tests", "packages/backbones/tests", "packages/cuda_ops/tests", "apps/classification/tests", "apps/detection/tests"]

nox.options.default_venv_backend = "none"
nox.options.sessions = ["build_ops", "test"]


def _env_hash() -> str:
    digest = hashlib.sha256()
    for name in ENV_FILES:
        digest.update(name.encode())
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _python(session: nox.Session) -> str:
    """Create or update the shared environment and return its interpreter."""
    if not PYTHON.exists():
        session.run(sys.executable, "-m", "venv", str(VENV), external=True)
    wanted = _env_hash()
    if not STAMP.exists() or STAMP.read_text() != wanted:
        pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check"]
        session.run(*pip, "-r", "requirements.txt", external=True)
        # detectron2: our patched, pinned build (or the user's own install, if one exists).
        session.run(str(PYTHON), "third_party/detectron2/build_wheel.py", "--install", external=True)
        session.run(*pip, "--no-deps", "--no-build-isolation", "-e", "packages/backbones", external=True)
        STAMP.write_text(wanted)
    return str(PYTHON)


def _cuda_available_for_build() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    if os.environ.get("FORCE_CUDA") == "0":
        return False
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return Path(cuda_home, "bin", "nvcc").exists()


@nox.session
def build_ops(session: nox.Session) -> None:
    """Build stm_cuda_ops with ninja: the CPU kernel always, the CUDA kernels when nvcc is present."""
    python = _python(session)
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))}
    if _cuda_available_for_build():
        env["FORCE_CUDA"] = "1"
        env["CUDA_HOME"] = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        env["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    else:
        env["FORCE_CUDA"] = "0"
    session.log(f"building stm_cuda_ops (FORCE_CUDA={env['FORCE_CUDA']})")
    session.run(
        python, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
        "--no-build-isolation", "-e", "packages/cuda_ops", env=env, external=True,
    )
    session.run(python, "-c", "import stm_cuda_ops; print(stm_cuda_ops.build_info())", external=True)


@nox.session
def test(session: nox.Session) -> None:
    """Run the tests of every package and app (pass pytest arguments after --)."""
    python = _python(session)
    args = session.posargs or [p for p in TEST_PATHS if (ROOT / p).is_dir()]
    session.run(python, "-m", "pytest", *args, env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
                external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole workspace."""
    python = _python(session)
    session.run(python, "-m", "ruff", "check", ".", external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: JSON + markdown tables under benchmarks/results/."""
    python = _python(session)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    names = session.posargs or ["ms_deform_attn", "models_cpu"]
    for name in names:
        session.run(python, f"benchmarks/bench_{name}.py", external=True)


@nox.session
def gpu_check(session: nox.Session) -> None:
    """GPU acceptance on a machine with a CUDA device (benchmarks/gpu_check.py; results in
    benchmarks/results/gpu/). `nox -s gpu_check -- --dry-run` lists every step without running any
    (no GPU and no environment sync needed: it only prints)."""
    python = sys.executable if "--dry-run" in session.posargs else _python(session)
    session.run(python, "benchmarks/gpu_check.py", *session.posargs, external=True)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the embedded default data: a micro model trained on the digits."""
    python = _python(session)
    out = ROOT / "output" / "demo_digits"
    if out.exists() and "--fresh" in session.posargs:
        shutil.rmtree(out)
    session.run(
        python, "apps/classification/main.py", "--model", "unified_convnext_micro", "--epochs", "5",
        "--output_dir", str(out), external=True,
    )
