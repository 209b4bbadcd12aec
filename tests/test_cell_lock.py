"""records.cell_lock: one process per cell, across processes; a killed holder never leaves the cell locked."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from bench import BenchError
from bench.records import cell_lock, lock_path

HOLDER = textwrap.dedent("""
    import sys, time
    from bench.records import cell_lock
    with cell_lock(sys.argv[1], "abc"):
        print("held", flush=True)
        sys.stdin.readline()                   # hold until told (or killed)
    print("released", flush=True)
""")


def _holder(results):
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(results)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(BenchError) as e:
            with cell_lock(str(tmp_path), "abc"):
                pytest.fail("entered a cell another process holds")
        msg = str(e.value)
        assert msg.startswith(f"cell abc is being computed by another process (pid {p.pid})") and "\n" not in msg
        assert os.path.exists(lock_path(str(tmp_path), "abc"))          # the refused side removed nothing
        with cell_lock(str(tmp_path), "other"):                            # other cells are free
            pass
    finally:
        p.communicate("go\n", timeout=60)
    assert p.returncode == 0
    assert not os.path.exists(lock_path(str(tmp_path), "abc"))          # its holder removed it
    with cell_lock(str(tmp_path), "abc") as path:
        assert open(path).read().strip() == str(os.getpid())


def test_killed_holder_leaves_the_cell_free(tmp_path):
    p = _holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    path = lock_path(str(tmp_path), "abc")
    assert os.path.exists(path)                                          # the stale file stays...
    with cell_lock(str(tmp_path), "abc"):                                # ...but the lock went with the process
        assert open(path).read().strip() == str(os.getpid())
    assert not os.path.exists(path)


def test_same_process_twice_is_refused_and_an_error_releases(tmp_path):
    with cell_lock(str(tmp_path), "k"):
        with pytest.raises(BenchError, match=rf"pid {os.getpid()}"):
            with cell_lock(str(tmp_path), "k"):
                pass
    with pytest.raises(RuntimeError):
        with cell_lock(str(tmp_path), "k"):
            raise RuntimeError("cell failed")
    with cell_lock(str(tmp_path), "k"):                                  # released by the failure
        pass
