"""Kernel builds survive a build killed halfway: torch's stale baton does not make later processes wait forever."""

import fcntl
import logging
import os
import subprocess
import sys
import threading

import pytest

from meswitch.engine.kernels.cpu_build import BATON, GUARD, build_dir, build_guard

# A source that stops the compiler at once: torch's build machinery (and its baton) runs in full, cheaply.
SOURCE = "#error this kernel does not build\n"
BUILD = """
import sys
from pathlib import Path
from meswitch.engine.kernels.cpu_build import compile_kernel
mod, why = compile_kernel("meswitch_test_stop", "stop", Path(sys.argv[1]), [], "test kernel")
print(mod, why)
"""


def test_guard_removes_a_stale_baton(tmp_path, caplog):
    (tmp_path / BATON).touch()  # as a build killed mid-compile leaves it
    with caplog.at_level(logging.WARNING), build_guard(tmp_path):
        assert not (tmp_path / BATON).exists()
    assert "interrupted" in caplog.text


def test_guard_excludes_another_builder(tmp_path):
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with build_guard(tmp_path):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(10)
    fd = os.open(tmp_path / GUARD, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held: a second builder would wait, not race
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        release.set()
        t.join(10)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with its holder
    finally:
        os.close(fd)


def test_build_after_a_killed_build(tmp_path, monkeypatch):
    """torch's build runs in a directory holding its stale baton and ends (here: the compile error), not waits forever."""
    source = tmp_path / "stop.cpp"
    source.write_text(SOURCE)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MESWITCH_CACHE", str(cache))  # the subprocess's cache, and build_dir's here
    build = build_dir("stop")
    build.mkdir(parents=True)
    (build / BATON).touch()
    out = subprocess.run([sys.executable, "-c", BUILD, str(source)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("None the kernel did not build"), out.stdout
    assert not (build / BATON).exists()  # torch's own baton, taken and released by the build
