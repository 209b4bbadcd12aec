"""bench.fingerprint: checkpoint sha256 computed once per (file, size, mtime), dataset file-list hashes, and the
one-line reason a cell is recomputed."""
import hashlib
import json
import os

import pytest

from bench import BenchError, fingerprint
from bench.fingerprint import checkpoint_fingerprint, dataset_fingerprint, describe_change


@pytest.fixture
def hashes(monkeypatch):
    """Counts the real sha256 computations."""
    calls = []
    real = fingerprint.sha256_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(fingerprint, "sha256_file", counting)
    return calls


def test_checkpoint_sha256_is_computed_once_and_cached_beside_it(tmp_path, hashes):
    ck = tmp_path / "weights" / "san_vit_b_16.pth"
    ck.parent.mkdir()
    ck.write_bytes(b"a" * 1000)
    fp = checkpoint_fingerprint(str(ck))
    assert fp == {"file": str(ck), "size": 1000, "mtime_ns": ck.stat().st_mtime_ns,
                  "sha256": hashlib.sha256(b"a" * 1000).hexdigest()}
    assert checkpoint_fingerprint(str(ck)) == fp and len(hashes) == 1          # second call: from the cache
    cache = json.loads((ck.parent / ".checkpoint_sha256.json").read_text())["entries"]
    assert cache[os.path.realpath(ck)]["sha256"] == fp["sha256"]
    ck.write_bytes(b"b" * 1000)                                                 # same size, new bytes
    os.utime(ck, ns=(fp["mtime_ns"] + 10**9, fp["mtime_ns"] + 10**9))
    new = checkpoint_fingerprint(str(ck))
    assert len(hashes) == 2 and new["sha256"] == hashlib.sha256(b"b" * 1000).hexdigest()
    assert describe_change({"checkpoint": fp}, {"checkpoint": new}) == (
        f"checkpoint {ck} changed (sha256 {fp['sha256'][:8]}… -> {new['sha256'][:8]}…)")


def test_touched_checkpoint_is_rehashed_but_not_a_change(tmp_path, hashes):
    ck = tmp_path / "c.pth"
    ck.write_bytes(b"x" * 10)
    fp = checkpoint_fingerprint(str(ck), cache_dir=str(tmp_path / "cache"))
    os.utime(ck, ns=(fp["mtime_ns"] + 5, fp["mtime_ns"] + 5))
    again = checkpoint_fingerprint(str(ck), cache_dir=str(tmp_path / "cache"))
    assert len(hashes) == 2 and again["mtime_ns"] != fp["mtime_ns"]
    assert describe_change({"checkpoint": fp}, {"checkpoint": again}) == ""
    assert (tmp_path / "cache" / ".checkpoint_sha256.json").is_file()
    assert not (tmp_path / ".checkpoint_sha256.json").exists()


def test_damaged_or_unwritable_cache_never_fails(tmp_path, hashes, caplog):
    ck = tmp_path / "c.pth"
    ck.write_bytes(b"x")
    (tmp_path / ".checkpoint_sha256.json").write_text('{"entries": {"')
    assert checkpoint_fingerprint(str(ck))["sha256"] == hashlib.sha256(b"x").hexdigest()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    fp = checkpoint_fingerprint(str(ck), cache_dir=str(blocker / "cache"))     # cannot write: logged, still works
    assert fp["sha256"] == hashlib.sha256(b"x").hexdigest() and "sha256 cache not saved" in caplog.text
    with pytest.raises(BenchError, match=r"cannot read checkpoint .*gone\.pth"):
        checkpoint_fingerprint(str(tmp_path / "gone.pth"))


def _dataset(root, names_sizes):
    paths = []
    for name, size in names_sizes:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * size)
        paths.append(str(p))
    return paths


def test_dataset_fingerprint_is_relative_sorted_and_sees_sizes(tmp_path):
    files = [("images/b.jpg", 3), ("images/a.jpg", 5)]
    a = dataset_fingerprint(_dataset(tmp_path / "one", files))
    b = dataset_fingerprint(list(reversed(_dataset(tmp_path / "two", files))))
    assert a["n_images"] == 2 and a["list_sha256"] == b["list_sha256"] and a["root"] != b["root"]
    want = hashlib.sha256(b"a.jpg\t5\nb.jpg\t3\n").hexdigest()
    assert a["list_sha256"] == want
    c = dataset_fingerprint(_dataset(tmp_path / "three", [("images/b.jpg", 4), ("images/a.jpg", 5)]))
    assert c["list_sha256"] != a["list_sha256"]
    assert describe_change({"dataset": a}, {"dataset": c}) == (
        f"dataset {c['root']} file list changed (2 images, list sha256 {a['list_sha256'][:8]}… -> "
        f"{c['list_sha256'][:8]}…)")
    with_root = dataset_fingerprint(_dataset(tmp_path / "four", files), root=str(tmp_path / "four"))
    assert with_root["list_sha256"] == hashlib.sha256(b"images/a.jpg\t5\nimages/b.jpg\t3\n").hexdigest()


def test_describe_change_one_line_reasons():
    small = {"root": "/d", "n_images": 2, "list_sha256": "1" * 64}
    full = {"root": "/d", "n_images": 2000, "list_sha256": "2" * 64}
    ck = {"file": "weights/san_vit_b_16.pth", "size": 1, "mtime_ns": 1, "sha256": "ab12" + "0" * 60}
    ck2 = {**ck, "sha256": "cd34" + "0" * 60, "mtime_ns": 2}
    assert describe_change({"dataset": small}, {"dataset": full}) == "dataset now has 2000 images, record has 2"
    assert describe_change({"checkpoint": ck, "dataset": small}, {"checkpoint": ck2, "dataset": full}) == (
        "checkpoint weights/san_vit_b_16.pth changed (sha256 ab120000… -> cd340000…); "
        "dataset now has 2000 images, record has 2")
    assert describe_change({"checkpoint": ck, "dataset": full}, {"checkpoint": dict(ck), "dataset": dict(full)}) == ""
    assert describe_change({}, {"checkpoint": ck2, "dataset": full}) == ""      # a record from before fingerprints
