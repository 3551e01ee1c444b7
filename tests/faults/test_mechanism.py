"""The fault-injection mechanism itself, the directory locks and the one-line errors (fast, in-process)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sppd_megatron import faults, locking
from sppd_megatron.config import error_line

ROOT = Path(__file__).resolve().parents[2]


def test_spec_errors_name_the_problem():
    with pytest.raises(faults.FaultSpecError, match="unknown point 'sample.treez'"):
        faults.parse("sample.treez:1")
    with pytest.raises(faults.FaultSpecError, match="action"):
        faults.parse("train.step:1:explode")
    with pytest.raises(faults.FaultSpecError, match="only at train.grad"):
        faults.parse("train.step:1:nan")
    assert faults.parse("train.grad@1:2:nan, ckpt.model, train.step[dpo]:3") == [
        faults.Fault("train.grad", 2, "nan", 1), faults.Fault("ckpt.model", 1, "kill", None),
        faults.Fault("train.step", 3, "kill", None, "dpo")]


def test_the_nth_hit_fails_with_the_path_and_rank_filters(arm, monkeypatch):
    arm("pairs.write:2:enospc,score.tree@1:1:eacces")
    assert faults.hit("pairs.write", "a.jsonl") is None
    with pytest.raises(OSError) as err:
        faults.hit("pairs.write", "b.jsonl")
    assert err.value.errno == errno.ENOSPC and err.value.filename == "b.jsonl"
    assert "b.jsonl: No space left on device" in error_line(err.value)
    assert "run the same command again to resume" in error_line(err.value)
    assert faults.hit("score.tree", "t.jsonl") is None  # armed for rank 1 only
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(PermissionError, match="Permission denied"):
        faults.hit("score.tree", "t.jsonl")


def test_a_label_picks_the_process(arm):
    arm("train.metrics[dpo]:1:enospc")
    faults.set_label("sft")
    try:
        assert faults.hit("train.metrics", "m") is None
        faults.set_label("dpo")
        with pytest.raises(OSError):
            faults.hit("train.metrics", "m")
    finally:
        faults.set_label(None)


def test_every_point_is_documented_and_used_by_the_suite():
    docs = (ROOT / "docs" / "faults.md").read_text()
    suite = "".join(p.read_text() for p in (ROOT / "tests" / "faults").glob("test_*.py"))
    for point in faults.POINTS:
        assert f"`{point}`" in docs, point
        assert re.search(rf"{re.escape(point)}[:@\"']", suite), f"no test injects a fault at {point}"
    for action in faults.ACTIONS:
        assert f"`{action}`" in docs, action


def test_error_line_is_one_line():
    assert error_line(ValueError("first\n  second\n")) == "first second"
    assert error_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "x/y")) == "x/y: No such file or directory"


# --- one writer per directory -------------------------------------------------------------------------

HOLD = "import sys, time; from sppd_megatron import locking; locking.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, capsys, tally):
    from sppd_megatron.sampling.cli import main as sample

    out = tmp_path / "trees"
    holder = _holder(out)
    try:
        assert sample([str(ROOT / "configs/tiny-cpu/sample.yaml"), f"output_dir={out}", "num_questions=1"]) == 2
        from faultlib import clean_error

        line = clean_error(capsys.readouterr().err, "sppd-megatron sample", str(out), f"pid {holder.pid}",
                           f"host {socket.gethostname()}")
        assert "another command is writing this directory" in line
        tally.fault("sample", "second writer", "clean error")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The holder died without releasing: its lock file is still there, with its pid.
    assert json.loads((out / locking.LOCK_FILE).read_text())["pid"] == holder.pid
    with locking.locked(out):
        assert json.loads((out / locking.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {holder.pid}" in capsys.readouterr().err
    assert not (out / locking.LOCK_FILE).exists()  # released: finished directories hold no lock file
    tally.fault("sample", "stale lock", "recovered")


def test_locks_are_reentrant_and_a_refused_command_leaves_no_directory(tmp_path):
    out = tmp_path / "new"
    with locking.locked(out):
        with locking.locked(out):
            assert (out / locking.LOCK_FILE).is_file()
        assert (out / locking.LOCK_FILE).is_file()
    assert not out.exists()


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    """Network filesystems without flock (ENOLCK): a live holder on this host is refused, a dead one taken over."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / locking.LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                               "command": "x", "since": time.time()}))
        with pytest.raises(locking.LockHeld, match=f"pid {sleeper.pid}"):
            locking.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    with locking.locked(tmp_path):
        pass
