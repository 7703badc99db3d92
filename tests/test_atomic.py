import os
from pathlib import Path

import pytest

from meswitch.utils.atomic import atomic_dir, atomic_write_bytes, atomic_write_json


def _tmp_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")]


def test_atomic_write_replaces_whole_file(tmp_path):
    f = tmp_path / "a" / "x.bin"
    atomic_write_bytes(f, b"one")
    atomic_write_bytes(f, b"two!")
    assert f.read_bytes() == b"two!"
    assert _tmp_leftovers(f.parent) == []


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    f = tmp_path / "x.json"
    atomic_write_json(f, {"v": 1})

    def boom(src, dst):
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(f, {"v": 2})
    monkeypatch.undo()
    assert '"v": 1' in f.read_text()
    assert _tmp_leftovers(tmp_path) == []


def test_atomic_dir_crash_leaves_previous_entry(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "w").write_text("half")
        raise RuntimeError("killed halfway")
    assert (target / "w").read_text() == "old"
    assert _tmp_leftovers(tmp_path) == []


def test_atomic_dir_cleans_stale_temporaries(tmp_path):
    stale = tmp_path / ".tmp-ckpt-999-deadbeef"
    stale.mkdir()
    (stale / "junk").write_text("left by a killed build")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "w").write_text("new")
    assert not stale.exists()
    assert (tmp_path / "ckpt" / "w").read_text() == "new"


def test_file_lock_makes_a_second_holder_wait(tmp_path):
    import threading
    import time

    from meswitch.utils.lock import file_lock

    order, waited = [], []
    lock = tmp_path / "zoo" / ".lock"

    def second():
        with file_lock(lock, on_wait=lambda: waited.append(True)):
            order.append("second")

    with file_lock(lock):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        order.append("first")
    t.join(5)
    assert order == ["first", "second"] and waited == [True]
