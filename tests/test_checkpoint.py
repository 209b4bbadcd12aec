"""Checkpoint loading: wrappers, strict key diff, refused pickles, truncated and foreign files."""
import argparse
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from bench import BenchError
from bench.models.checkpoint import (PickleRefused, format_diff, key_diff, load_checkpoint, load_state_dict_strict,
                                     read_state_dict)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.register_buffer("extra", torch.ones(2))


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "module_prefix"])
def test_published_wrappers_load_strictly(tmp_path, wrap):
    src = Tiny()
    sd = src.state_dict()
    obj = {"bare": sd, "model": {"model": sd, "iteration": 5}, "state_dict": {"state_dict": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    dst = Tiny()
    report = load_checkpoint(dst, _save(obj, tmp_path / "c.pth"))
    assert torch.equal(dst.a.weight, src.a.weight)
    assert len(report.sha256) == 64 and report.ignored_keys == []


def test_key_diff_names_missing_unexpected_and_shapes():
    model = Tiny()
    sd = dict(model.state_dict())
    sd.pop("a.bias")
    sd["a.weight"] = torch.zeros(5, 3)
    sd["stray"] = torch.zeros(1)
    missing, unexpected, shapes = key_diff(model, sd)
    assert missing == ["a.bias"] and unexpected == ["stray"]
    assert shapes == ["a.weight: file [5, 3] vs model [4, 3]"]
    with pytest.raises(BenchError, match=r"1 missing \[a.bias\]; 1 unexpected \[stray\]; 1 shape mismatches"):
        load_state_dict_strict(model, sd, "x.pth")
    assert "(+2)" in format_diff([str(i) for i in range(7)], [], [])


def test_ignored_prefixes_and_optional_keys(tmp_path):
    model = Tiny()
    sd = dict(model.state_dict())
    sd["unused.branch.w"] = torch.zeros(3)
    report = load_state_dict_strict(model, dict(sd), "x", ignore_prefixes=("unused.",))
    assert report.ignored_keys == ["unused.branch.w"] and "ignored 1" in report.note()
    sd.pop("unused.branch.w")
    sd.pop("extra")
    report = load_state_dict_strict(model, dict(sd), "x", optional_keys=("extra",))
    assert report.absent_optional == ["extra"]
    sd.pop("a.bias")  # any other missing key still fails
    with pytest.raises(BenchError, match="missing"):
        load_state_dict_strict(model, sd, "x", optional_keys=("extra",))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_running_pickle_is_refused_with_the_opt_in_named(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(BenchError, match="allow_unsafe_pickle=true"):
        read_state_dict(str(path))


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "zip_not_checkpoint", "text", "tensor"])
def test_bad_files_give_one_line(tmp_path, kind):
    path = tmp_path / "bad.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(Tiny().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zip_not_checkpoint":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "not a checkpoint")
    elif kind == "text":
        path.write_text("<html>quota exceeded</html>")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    with pytest.raises(BenchError) as e:
        load_checkpoint(Tiny(), str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg


# --------------------------------------------------------------------------------------------------------------
# "download it again" (not a checkpoint / truncated / corrupt) vs "the safe loader refuses a global" (issue 18 item 3)

PUBLISHED_SHA = "d616d2767b206d66b70a7742398c9b818beaf9742e134894449196af11bf19da"
BOILERPLATE = ("PyTorch 2.6", "Check the documentation", "file an issue", "WeightsUnpickler", "enforce fail",
               "Weights only load failed")


def _checkpoint_bytes(legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(Tiny().state_dict(), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _redownload_message(path, **expected) -> str:
    with pytest.raises(BenchError) as e:
        read_state_dict(str(path), **expected)
    msg = str(e.value)
    assert not isinstance(e.value, PickleRefused)
    assert "\n" not in msg and str(path) in msg and "download it again" in msg
    assert "allow_unsafe_pickle" not in msg and not any(b in msg for b in BOILERPLATE), msg
    return msg


def test_random_bytes_ask_for_a_download_with_the_published_size_and_sha(tmp_path):
    path = tmp_path / "san_vit_b_16.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _redownload_message(path, expected_size=698678283, expected_sha256=PUBLISHED_SHA)
    assert "not a torch checkpoint" in msg
    assert "this file has 4,096 bytes, the published one 698,678,283" in msg and PUBLISHED_SHA in msg
    assert "published" not in _redownload_message(path)                 # unpublished size/sha: no claim made


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_real_checkpoint_asks_for_a_download(tmp_path, legacy):
    data = _checkpoint_bytes(legacy)
    path = tmp_path / "c.pth"
    path.write_bytes(data[: len(data) // 2])
    msg = _redownload_message(path, expected_size=len(data))
    assert "truncated or corrupt" in msg and f"the published one {len(data):,}" in msg


def test_zip_plain_pickle_and_html_are_not_checkpoints(tmp_path):
    z = tmp_path / "z.pth"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("hello.txt", "not a checkpoint")
    assert "zip archive without data.pkl" in _redownload_message(z)
    p = tmp_path / "p.pth"
    p.write_bytes(pickle.dumps({"w": [1, 2]}))
    assert "a Python pickle without torch.save's header" in _redownload_message(p)
    h = tmp_path / "h.pth"
    h.write_text("<html>\n quota exceeded</html>\n")
    assert "it starts with '<html> quota exceeded</': an error or login page?" in _redownload_message(h)


def test_corrupt_pickle_inside_a_torch_zip_is_a_download_not_an_opt_in(tmp_path):
    data = bytearray(_checkpoint_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)   # stored, not compressed
    data[start + 2:start + info.file_size] = b"\xf7" * (info.file_size - 2)
    path = tmp_path / "c.pth"
    path.write_bytes(bytes(data))
    assert "is corrupt: its pickle does not parse" in _redownload_message(path)


def test_torch_reader_error_kept_as_a_whole_sentence(tmp_path):
    data = _checkpoint_bytes()
    path = tmp_path / "c.pth"
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(path, "w") as dst:
        for i in src.infolist():
            if "/data/" not in i.filename:                      # the tensor storage is gone
                dst.writestr(i, src.read(i))
    msg = _redownload_message(path)
    assert "truncated or corrupt (" in msg and msg.count("(") == msg.count(")")


@pytest.mark.parametrize("payload,name", [(argparse.Namespace(lr=0.1), "argparse.Namespace"),
                                          (Evil(), "posix.system")])
def test_foreign_global_is_named_and_only_then_the_opt_in(tmp_path, payload, name):
    path = tmp_path / "c.pth"
    torch.save({"model": Tiny().state_dict(), "extra": payload}, path)
    with pytest.raises(PickleRefused) as e:
        load_checkpoint(Tiny(), str(path), expected_size=1, expected_sha256=PUBLISHED_SHA)
    msg = str(e.value)
    assert e.value.global_name == name and f"needs the Python global {name}," in msg
    assert msg.endswith("rerun with allow_unsafe_pickle=true") and "\n" not in msg
    assert not any(b in msg for b in BOILERPLATE) and e.value.__cause__ is None
    if name == "argparse.Namespace":                              # opted in, it loads (argparse is importable)
        load_checkpoint(Tiny(), str(path), allow_unsafe_pickle=True)


def test_loadable_file_with_another_sha_is_noted(tmp_path):
    path = tmp_path / "c.pth"
    path.write_bytes(_checkpoint_bytes())
    report = load_checkpoint(Tiny(), str(path), expected_sha256=PUBLISHED_SHA)
    assert report.sha256_mismatch == PUBLISHED_SHA and "is not the published d616d2767b20" in report.note()
    assert load_checkpoint(Tiny(), str(path), expected_sha256=report.sha256).note() == ""
