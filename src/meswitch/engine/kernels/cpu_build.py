"""Building meswitch's C++ CPU kernels: the CPU's instruction-set flags, and one compiled, cached
extension per kernel and instruction set (under the meswitch cache, reused while torch's version holds)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from meswitch.paths import cache_root
from meswitch.utils.lock import file_lock

log = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


BATON = "lock"  # torch.utils.cpp_extension's build lock: a file that a killed build leaves behind
GUARD = ".meswitch-build.lock"  # ours: an flock, which the kernel releases when its holder dies


@contextlib.contextmanager
def build_guard(build: Path) -> Iterator[None]:
    """Exclusive use of the build directory ``build`` across processes, and no stale torch baton in it.

    torch's own build lock is a file that exists while a build runs; a build killed halfway (a timeout, a
    Ctrl-C in the middle of the compile) leaves it, and every later process then waits for it forever.
    Every meswitch build takes this flock first, so a baton found while holding it belongs to no live build:
    it is removed (with a warning) and the build goes on.
    """
    with file_lock(build / GUARD, on_wait=lambda: log.warning("waiting for another process building in %s", build)):
        baton = build / BATON
        if baton.exists():
            log.warning("removing %s, left by a kernel build that was interrupted", baton)
            baton.unlink(missing_ok=True)
        yield


def build_dir(build_name: str) -> Path:
    """Where kernel ``build_name`` is compiled and cached: ``kernels/<build_name>-torch<version>`` in the cache."""
    return cache_root() / "kernels" / f"{build_name}-torch{torch.__version__.replace('+', '_')}"


def compile_kernel(module: str, build_name: str, source: Path, cflags: list[str], what: str,
                   functions: list[str] | None = None) -> tuple[object | None, str | None]:
    """``source`` compiled as extension ``module`` into ``kernels/<build_name>-torch<version>``: ``(module,
    None)``, or ``(None, why)`` when it does not build (no compiler, no ninja, a compile error).

    ``cflags`` come after ``-O3 -fopenmp``; ``functions``: bind these with ``load_inline`` (a source with
    no pybind module of its own), else the source is built as it is with ``load``. ``what`` names the
    kernel in the one-time "compiling" warning.
    """
    try:
        from torch.utils.cpp_extension import load, load_inline

        build = build_dir(build_name)
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            log.warning("compiling the %s into %s (first use only, about 30 s)", what, build)
        flags = ["-O3", "-fopenmp", *cflags]
        with build_guard(build):
            if functions is None:
                mod = load(module, [str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           build_directory=str(build), verbose=False)
            else:
                mod = load_inline(module, [source.read_text()], functions=functions, extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the caller's PyTorch path serves instead
        return None, f"the kernel did not build: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
    return mod, None
