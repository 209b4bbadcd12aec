"""records.atomic_write: the one way a file is written whole (records, tables, text cache, SHA256SUMS). A full,
read-only or forbidden disk is one BenchError line naming the path, the errno and the fix, with no temp file left;
files get the umask's mode (not mkstemp's 0600)."""
import contextlib
import errno
import json
import os
import subprocess

import pytest
import torch

from bench import BenchError, records
from bench.models import text_cache


def _tmp_files(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".tmp")]


def _one_line(e: BenchError, path, *fragments) -> str:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg
    assert all(f in msg for f in fragments), msg
    assert e.__cause__ is None and e.__suppress_context__      # no chained OSError traceback
    return msg


@contextlib.contextmanager
def _tmpfs(where, size: str = "64k"):
    """A real, tiny tmpfs at `where` (root and `mount` needed; skipped otherwise)."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a tmpfs; test_enospc_in_the_real_code_path covers it")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.decode().strip()[:80]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder) -> None:
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


def test_real_full_disk_and_read_only_disk(tmp_path, capsys):
    with _tmpfs(tmp_path / "disk") as disk:
        runs = disk / "runs"
        good = runs / "k.json"
        records.atomic_write_json(str(good), {"key": "k", "status": "ok"})
        _fill(disk)
        with pytest.raises(BenchError) as e:
            records.atomic_write_json(str(good), {"key": "k", "status": "ok", "payload": "x" * 100_000})
        _one_line(e.value, good, "No space left on device (ENOSPC)",
                  "free space on that disk, or set results_dir=<a folder on another disk>")
        assert _tmp_files(runs) == [] and json.loads(good.read_text())["status"] == "ok"   # the old record kept

        text_cache.set_cache_dir(str(disk / "cache" / "text"))
        try:
            with pytest.raises(BenchError) as e:
                text_cache.cached(torch.nn.Linear(2, 2), ["a photo of a cat."], lambda: torch.zeros(300, 512))
        finally:
            text_cache.set_cache_dir(None)
        _one_line(e.value, disk / "cache" / "text", "ENOSPC")
        assert _tmp_files(disk / "cache" / "text") == []

        (disk / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(BenchError) as e:
            records.atomic_write_text(str(disk / "runs.csv"), "a,b\n")
        _one_line(e.value, disk / "runs.csv", "Read-only file system (EROFS)", "set results_dir=<a writable folder>")
        from bench.leaderboard import main                      # the board on a read-only results dir: one line
        assert main([f"results_dir={disk}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "EROFS" in err and "Traceback" not in err


def test_enospc_in_the_real_code_path(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "k.json"
    records.atomic_write_json(str(path), {"key": "k", "status": "ok"})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(BenchError) as e:
        records.atomic_write_json(str(path), {"key": "k", "status": "error"})
    _one_line(e.value, path, "No space left on device (ENOSPC)", "results_dir=")
    assert _tmp_files(path.parent) == [] and json.loads(path.read_text())["status"] == "ok"
    with pytest.raises(BenchError, match=r"weights_dir=<a folder on another disk>"):
        from bench import fetch
        fetch.record_sum(str(tmp_path / "w"), "x.pth", "0" * 64)
    assert _tmp_files(tmp_path / "w") == []


def test_forbidden_folder_names_the_setting(tmp_path, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(BenchError) as e:
        records.atomic_write(str(tmp_path / "x.txt"), b"x", setting="weights_dir")
    _one_line(e.value, tmp_path / "x.txt", "Permission denied (EACCES)", "set weights_dir=<a writable folder>")


def test_a_failing_writer_leaves_nothing_and_keeps_its_exception(tmp_path):
    def boom(f):
        f.write(b"half")
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        records.atomic_write(str(tmp_path / "x.bin"), boom)
    assert os.listdir(tmp_path) == []
    records.atomic_write(str(tmp_path / "x.bin"), lambda f: torch.save(torch.ones(2), f))
    assert torch.equal(torch.load(tmp_path / "x.bin", weights_only=True), torch.ones(2))
    records.atomic_write(str(tmp_path / "t.txt"), "é\n")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_take_the_umask_mode_not_0600(tmp_path, umask):
    old = os.umask(umask)
    records._file_mode.cache_clear()
    try:
        records.atomic_write_json(str(tmp_path / "runs" / "k.json"), {"key": "k"})
        records.atomic_write_text(str(tmp_path / "runs.csv"), "a\n")
        text_cache.set_cache_dir(str(tmp_path / "cache"))
        text_cache.cached(torch.nn.Linear(2, 2), ["x"], lambda: torch.zeros(2))
    finally:
        text_cache.set_cache_dir(None)
        os.umask(old)
        records._file_mode.cache_clear()
    want = 0o666 & ~umask
    for p in (tmp_path / "runs" / "k.json", tmp_path / "runs.csv", *(tmp_path / "cache").iterdir()):
        assert os.stat(p).st_mode & 0o777 == want, (p, oct(os.stat(p).st_mode))
