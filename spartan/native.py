"""The C kernel behind the ``packed`` sparse inference kernel, compiled on first use for the machine it runs on.

``csrc/packed_linear.c`` is compiled by the system C compiler (``$CC``, else ``cc``) with ``-O3 -march=native``
into a shared library loaded with :mod:`ctypes`; no Python headers or PyTorch extension build are involved, so
the first build takes well under a second. The library is cached in ``$SPARTAN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/spartan``, else ``~/.cache/spartan``) under a name that hashes the source, the compiler command
and the CPU's model and feature flags: a cache shared by the nodes of a cluster never hands one CPU a library
built for instructions it lacks. Builds write a temporary file and rename it, so processes building at once do
not corrupt each other's result. Where no library can be built, :func:`packed_linear_library` returns ``None`` and
:func:`build_error` says why; the sparse inference code then does without the kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread")
BUILD_TIMEOUT_S = 120
_errors: dict[str, str] = {}


def cache_dir() -> Path:
    if os.environ.get("SPARTAN_CACHE_DIR"):
        return Path(os.environ["SPARTAN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spartan"


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (what ``-march=native`` compiles for), as far as the OS says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _build(name: str) -> Path:
    """The library for ``csrc/{name}.c`` on this machine, built into the cache if it is not there yet."""
    source = resources.files("spartan").joinpath("csrc", f"{name}.c").read_bytes()
    command = [*_compiler(), *FLAGS]
    key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), _cpu_signature().encode()])).hexdigest()
    target = cache_dir() / f"{name}-{platform.machine()}-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        (Path(work) / f"{name}.c").write_bytes(source)
        built = Path(work) / f"{name}.so"
        try:
            result = subprocess.run(
                [*command, str(Path(work) / f"{name}.c"), "-o", str(built)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
        except OSError as error:
            raise RuntimeError(f"no C compiler {command[0]!r} ({error}); install one (e.g. gcc) or set CC") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(command)} did not finish in {BUILD_TIMEOUT_S} s") from None
        if result.returncode:
            raise RuntimeError(
                f"{' '.join(command)} failed with exit code {result.returncode}: {result.stderr[-2000:]}"
            )
        os.replace(built, target)
    return target


@functools.cache
def packed_linear_library() -> ctypes.CDLL | None:
    """The loaded ``packed_linear`` library with its signature declared, or ``None`` if it cannot be built."""
    try:
        library = ctypes.CDLL(str(_build("packed_linear")))
    except (OSError, RuntimeError) as error:
        _errors["packed_linear"] = str(error)
        return None
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.packed_linear.restype = ctypes.c_int
    # (x, ldx, y, ldy, tokens, out, strip_ptr, cols, vals, width, bias, threads): see csrc/packed_linear.c
    library.packed_linear.argtypes = [pointer, i64, pointer, i64, i64, i64, *[pointer] * 3, i64, pointer, ctypes.c_int]
    return library


def build_error() -> str:
    """Why :func:`packed_linear_library` returned ``None`` (empty if it did not, or was not called yet)."""
    return _errors.get("packed_linear", "")
