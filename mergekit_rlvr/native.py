"""Native CPU kernels: a C source compiled once per machine and loaded with ctypes.

The system C compiler (``$CC``, ``cc`` or ``gcc``) builds the source in about a
second; the library is cached under ``$XDG_CACHE_HOME/mergekit-rlvr`` (default
``~/.cache/mergekit-rlvr``), keyed by the source, the compiler, the flags and the
CPU's features, built under a temporary name and renamed at the end (two processes
building at once both end with a whole library). Without a compiler, or where the
build fails, :func:`load` logs one warning line and returns None: each caller then
uses its torch path. The flags keep IEEE semantics (``-ffp-contract=off``, no
fast-math), so a kernel can promise the same float32 values as torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
_loaded: Dict[str, Optional[ctypes.CDLL]] = {}


def cpu_key() -> str:
    """The CPU's feature flags (``-march=native`` builds differ between CPUs)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergekit-rlvr"


def _with_headers(source: Path) -> bytes:
    """The source and the local headers it includes (``#include "x.h"``, beside it): what
    the build depends on, so the cache key changes when any of them does."""
    import re

    text = source.read_bytes()
    for name in re.findall(rb'^#include "([^"]+)"', text, flags=re.MULTILINE):
        text += _with_headers(source.parent / name.decode())
    return text


def _build(source: Path, flags: Sequence[str]) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    text = _with_headers(source)
    key = hashlib.sha256(text + " ".join([compiler, *flags, cpu_key()]).encode()).hexdigest()[:16]
    cache = cache_dir()
    path = cache / f"{source.stem}-{key}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built under a temporary name, renamed at the end
        built = Path(tmp) / f"{source.stem}.so"
        proc = subprocess.run([compiler, *flags, "-o", str(built), str(source)], capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "error" in line] or [proc.stderr.strip()]
            raise RuntimeError(f"{compiler} failed: {errors[0]}")
        os.replace(built, path)
    return path


def load(source: Path, symbols: Sequence[str], what: str, fallback: str,
         flags: Sequence[str] = FLAGS, optional: Sequence[str] = ()) -> Optional[ctypes.CDLL]:
    """The compiled ``source`` (cached per process and on disk), its ``symbols``
    returning void; None with one warning ``"<what> unavailable (<why>); <fallback>"``.
    ``optional``: flags tried first (``-fopenmp``), left out where the build with them fails."""
    key = f"{Path(source).resolve()} {' '.join(flags)} {' '.join(optional)}"
    if key in _loaded:
        return _loaded[key]
    _loaded[key] = None
    for extra in ([tuple(optional)] if optional else []) + [()]:
        try:
            lib = ctypes.CDLL(str(_build(Path(source), (*flags, *extra))))
            for name in symbols:
                getattr(lib, name).restype = None
            break
        except (OSError, RuntimeError, AttributeError) as error:
            why = error
    else:
        log.warning("%s unavailable (%s); %s", what, why, fallback)
        return None
    _loaded[key] = lib
    return lib
