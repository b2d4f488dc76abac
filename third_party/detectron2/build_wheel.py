#!/usr/bin/env python3
"""Build (and optionally install) the stm build of detectron2 0.6: a pure-Python wheel.

Run it with the Python of the environment that should get detectron2 (the standard library is all
it needs, plus pip, setuptools and `patch` or `git` at build time):

    .venv/bin/python third_party/detectron2/build_wheel.py            # build or reuse the wheel
    .venv/bin/python third_party/detectron2/build_wheel.py --install  # ... and install it

Steps:
  1. If this Python can already import a detectron2 that this recipe did not build (a compiled one,
     an editable checkout, ...), use it: print where it is and exit 0 without touching anything.
  2. Fetch the sdist pb1-detectron2==0.6 by exact URL into $STM_CACHE/downloads/ (default
     ~/.cache/stm) and check its sha256.
  3. Unpack it into a temporary directory, apply detectron2-0.6.patch (`patch -p1`, or `git apply`
     when patch(1) is missing) and copy overlay/ over the tree (our pure-Python detectron2/_C.py).
  4. `pip wheel --no-deps --no-build-isolation` into $STM_CACHE/wheels/. The version is
     0.6+stm.<hash of sdist, patch and overlay>, so a changed recipe gives a new wheel and a cached
     wheel is reused as long as the recipe is unchanged.
  5. With --install: `pip install --no-deps` the wheel (requirements.txt provides its dependencies),
     then check the installation and, with `pip check`, that detectron2's dependencies are met.

Every failure ends with a line starting with "error:" and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATCH = HERE / "detectron2-0.6.patch"
OVERLAY = HERE / "overlay"

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/"
    + SDIST_NAME
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
SDIST_ROOT = "pb1-detectron2-0.6"  # top-level directory inside the tarball
BASE_VERSION = "0.6"
# Bump when this script changes what ends up in the wheel (the patch and overlay are hashed anyway).
RECIPE_REVISION = "1"
# Written into detectron2/_C.py by overlay/; how an installed detectron2 is recognised as ours.
STM_MARKER = "STM_PURE_PYTHON_BUILD = True"
# Files the built wheel must contain.
REQUIRED_IN_WHEEL = (
    "detectron2/__init__.py",
    "detectron2/_C.py",
    "detectron2/model_zoo/configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "detectron2/model_zoo/configs/common/models/mask_rcnn_fpn.py",
)
SMOKE_TEST = """
import detectron2, detectron2._C as C, detectron2.layers
from detectron2 import model_zoo
assert getattr(C, "STM_PURE_PYTHON_BUILD", False), C.__file__
model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
print("detectron2", detectron2.__version__, "imports from", detectron2.__path__[0])
"""


class RecipeError(RuntimeError):
    """A failure with a message meant for the user."""


def log(message: str) -> None:
    print(f"[detectron2] {message}", flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("STM_CACHE") or Path.home() / ".cache" / "stm").expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def overlay_files() -> list[Path]:
    if not OVERLAY.is_dir():
        raise RecipeError(f"overlay directory {OVERLAY} is missing")
    files = sorted(
        p for p in OVERLAY.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )
    if not any(p.relative_to(OVERLAY).as_posix() == "detectron2/_C.py" for p in files):
        raise RecipeError(f"{OVERLAY / 'detectron2/_C.py'} is missing")
    return files


def recipe_hash() -> str:
    """Hash of everything that defines the wheel: sdist, patch, overlay files, recipe revision."""
    if not PATCH.is_file():
        raise RecipeError(f"patch {PATCH} is missing")
    digest = hashlib.sha256()
    digest.update(f"revision {RECIPE_REVISION}\nsdist {SDIST_SHA256}\n".encode())
    digest.update(b"patch\n" + PATCH.read_bytes())
    for path in overlay_files():
        digest.update(f"\noverlay {path.relative_to(OVERLAY).as_posix()}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# 1. An existing detectron2
# ------------------------------------------------------------------------------------------------
def installed_version(package_dir: Path) -> str | None:
    """Version of the distribution installed beside package_dir, else the package's __version__."""
    for dist in importlib.metadata.distributions(path=[str(package_dir.parent)]):
        if (dist.metadata["Name"] or "").lower() == "detectron2":
            return dist.version
    init = (package_dir / "__init__.py").read_text(errors="replace")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)", init, re.MULTILINE)
    return match.group(1) if match else None


def find_installed() -> tuple[str, Path | None, str | None]:
    """Classify the detectron2 this Python would import, without importing it.

    Returns (kind, package_dir, version) with kind one of "none", "stm" (built by this recipe),
    "compiled" (its _C is an extension module) or "other".
    """
    # The script's own directory is sys.path[0]; it must not shadow anything.
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    try:
        spec = importlib.util.find_spec("detectron2")
    finally:
        sys.path[:] = saved_path
    if spec is None or not spec.submodule_search_locations or spec.origin in (None, "namespace"):
        return "none", None, None  # nothing, or only a namespace directory named detectron2
    package_dir = Path(spec.origin).parent
    version = installed_version(package_dir)
    compiled = [p for p in package_dir.glob("_C.*") if p.suffix in (".so", ".pyd", ".dll", ".dylib")]
    if compiled:
        return "compiled", package_dir, version
    stand_in = package_dir / "_C.py"
    if stand_in.is_file() and STM_MARKER in stand_in.read_text(errors="replace"):
        return "stm", package_dir, version
    return "other", package_dir, version


# ------------------------------------------------------------------------------------------------
# 2. The sdist
# ------------------------------------------------------------------------------------------------
def fetch_sdist(local: Path | None) -> Path:
    downloads = cache_root() / "downloads"
    target = downloads / SDIST_NAME
    if local is not None:
        if not local.is_file():
            raise RecipeError(f"--sdist {local}: no such file")
        actual = sha256_of(local)
        if actual != SDIST_SHA256:
            raise RecipeError(f"--sdist {local}: sha256 is {actual}, expected {SDIST_SHA256}")
        log(f"sdist: using {local} (sha256 ok)")
        return local
    if target.is_file():
        actual = sha256_of(target)
        if actual == SDIST_SHA256:
            log(f"sdist: cached {target} (sha256 ok)")
            return target
        log(f"sdist: cached {target} has sha256 {actual}, expected {SDIST_SHA256}; downloading again")
        target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / f".{SDIST_NAME}.{os.getpid()}.part"
    last_error: Exception | None = None
    for attempt in range(1, 4):
        log(f"sdist: downloading {SDIST_URL} (attempt {attempt}/3)")
        try:
            request = urllib.request.Request(SDIST_URL, headers={"User-Agent": "stm-build-wheel"})
            with urllib.request.urlopen(request, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
            break
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            last_error = error
            partial.unlink(missing_ok=True)
            time.sleep(2 * attempt)
    else:
        raise RecipeError(
            f"could not download {SDIST_URL}: {last_error}. Without network access, download the file "
            f"elsewhere and pass --sdist PATH, or put it at {target}"
        )
    actual = sha256_of(partial)
    if actual != SDIST_SHA256:
        partial.unlink(missing_ok=True)
        raise RecipeError(
            f"sha256 mismatch for {SDIST_URL}: got {actual}, expected {SDIST_SHA256}. "
            "The file was not cached; refusing to build from it"
        )
    os.replace(partial, target)
    log(f"sdist: saved {target} (sha256 ok)")
    return target


def extract(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist, "r:gz") as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(into, filter="data")
        else:  # older Pythons: refuse absolute paths and '..' ourselves
            for member in archive.getmembers():
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise RecipeError(f"unexpected member {member.name!r} in {sdist}")
            archive.extractall(into)
    source = into / SDIST_ROOT
    if not (source / "setup.py").is_file():
        raise RecipeError(f"{sdist} does not contain {SDIST_ROOT}/setup.py")
    return source


# ------------------------------------------------------------------------------------------------
# 3. Patch and overlay
# ------------------------------------------------------------------------------------------------
def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def apply_patch(source: Path) -> None:
    patch_tool, git = shutil.which("patch"), shutil.which("git")
    if patch_tool:
        command = [patch_tool, "-p1", "--batch", "--forward", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(PATCH)]
    elif git:
        command = [git, "apply", "-p1", "--whitespace=nowarn", str(PATCH)]
    else:
        raise RecipeError("neither `patch` nor `git` is installed; one of them is needed to apply the patch")
    # `git apply` outside a repository patches plain files; never let it find a repository above.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(source.parent)}
    result = run(command, cwd=source, env=env)
    if result.returncode != 0:
        raise RecipeError(f"{PATCH.name} does not apply cleanly ({Path(command[0]).name}):\n{result.stdout.strip()}")
    log(f"patch: applied {PATCH.name} with {Path(command[0]).name}")


def copy_overlay(source: Path) -> None:
    for path in overlay_files():
        relative = path.relative_to(OVERLAY)
        destination = source / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        log(f"overlay: {relative.as_posix()}")
    # The sdist's stale metadata (under its old name) must not leak into the new build.
    for stale in source.glob("*.egg-info"):
        shutil.rmtree(stale)


# ------------------------------------------------------------------------------------------------
# 4. The wheel
# ------------------------------------------------------------------------------------------------
def check_wheel(wheel: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise RecipeError(f"{wheel} is not a valid wheel: {error}") from error
    if bad is not None:
        raise RecipeError(f"{wheel} is corrupt (bad member {bad})")
    missing = [name for name in REQUIRED_IN_WHEEL if name not in names]
    if missing:
        raise RecipeError(f"{wheel} lacks {', '.join(missing)}")
    if any(name.startswith("detectron2/_C.") and not name.endswith(".py") for name in names):
        raise RecipeError(f"{wheel} unexpectedly contains a compiled detectron2/_C")


def cached_wheel(wheels: Path, version: str) -> Path | None:
    for candidate in sorted(wheels.glob(f"detectron2-{version}-*.whl")):
        try:
            check_wheel(candidate)
        except RecipeError as error:
            log(f"wheel: discarding cached {candidate.name}: {error}")
            candidate.unlink()
            continue
        return candidate
    return None


def build_wheel(version: str, sdist_path: Path | None, force: bool) -> Path:
    wheels = cache_root() / "wheels"
    if not force:
        wheel = cached_wheel(wheels, version)
        if wheel is not None:
            log(f"wheel: cached {wheel}")
            return wheel
    sdist = fetch_sdist(sdist_path)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stm-detectron2-build-") as temp:
        source = extract(sdist, Path(temp))
        log(f"source: unpacked into {source}")
        apply_patch(source)
        copy_overlay(source)
        out = Path(temp) / "dist"
        env = {
            **os.environ,
            "D2_VERSION_SUFFIX": version[len(BASE_VERSION):],  # setup.py appends it to "0.6"
            "BUILD_NIGHTLY": "0",  # otherwise setup.py appends a date and rewrites __init__.py
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        command = [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
            "--use-pep517", "--wheel-dir", str(out), str(source),
        ]
        log(f"wheel: building {version} ({' '.join(command[1:6])} ...)")
        result = run(command, env=env)
        if result.returncode != 0:
            raise RecipeError(
                f"pip wheel failed (exit {result.returncode}); it needs setuptools in this environment:\n"
                + result.stdout.strip()
            )
        built = sorted(out.glob("detectron2-*.whl"))
        if len(built) != 1 or not built[0].name.startswith(f"detectron2-{version}-"):
            raise RecipeError(f"expected one detectron2-{version}-*.whl, pip produced {[p.name for p in built]}")
        check_wheel(built[0])
        wheels.mkdir(parents=True, exist_ok=True)
        wheel = wheels / built[0].name
        staging = wheels / f".{built[0].name}.{os.getpid()}.part"
        shutil.copyfile(built[0], staging)
        os.replace(staging, wheel)  # atomic: a concurrent run sees the old wheel or the whole new one
    log(f"wheel: built {wheel} in {time.monotonic() - started:.1f}s")
    return wheel


# ------------------------------------------------------------------------------------------------
# 5. Installation
# ------------------------------------------------------------------------------------------------
def install(wheel: Path, force: bool) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps"]
    if force:
        command.append("--force-reinstall")
    log(f"install: pip install --no-deps {wheel.name}")
    result = run(command + [str(wheel)])
    if result.returncode != 0:
        raise RecipeError(f"pip install failed (exit {result.returncode}):\n{result.stdout.strip()}")

    # Dependencies: the wheel declares them; requirements.txt must provide every one of them.
    result = run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"])
    problems = [line for line in result.stdout.splitlines() if line.lower().startswith("detectron2 ")]
    if problems:
        raise RecipeError(
            "detectron2 is installed but its dependencies are not met (add them to requirements.txt):\n  "
            + "\n  ".join(problems)
        )
    # Smoke test in a fresh interpreter, away from the source tree.
    result = run([sys.executable, "-c", SMOKE_TEST], cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise RecipeError(f"the installed detectron2 does not import:\n{result.stdout.strip()}")
    log(f"install: ok, {result.stdout.strip().splitlines()[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="pip install the wheel into this Python")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the wheel even if cached and reinstall it (never replaces a foreign detectron2)")
    parser.add_argument("--sdist", type=Path, help=f"use this local copy of {SDIST_NAME} instead of downloading")
    args = parser.parse_args(argv)

    kind, package_dir, found_version = find_installed()
    if kind in ("compiled", "other"):
        what = "a compiled detectron2" if kind == "compiled" else "a detectron2 not built by this recipe"
        log(f"found {what} ({found_version or 'unknown version'}) at {package_dir}: using it, nothing to do")
        if kind == "other":
            log("note: it has no compiled detectron2._C; uninstall it to get the patched stm build instead")
        return 0

    version = f"{BASE_VERSION}+stm.{recipe_hash()}"
    log(f"python: {sys.executable}; recipe version {version}; cache {cache_root()}")
    if kind == "stm" and found_version == version and args.install and not args.force:
        log(f"detectron2 {version} is already installed at {package_dir}: nothing to do")
        return 0
    if kind == "stm":
        log(f"installed stm build: {found_version} at {package_dir}"
            + ("" if found_version == version else " (out of date)"))

    wheel = build_wheel(version, args.sdist, args.force)
    if args.install:
        install(wheel, args.force)
    else:
        log(f"done: {wheel} (not installed; pass --install)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
