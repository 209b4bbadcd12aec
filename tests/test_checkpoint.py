"""Checkpoint loading: wrappers, strict key diff, refused pickles, truncated and foreign files."""
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from bench import BenchError
from bench.models.checkpoint import format_diff, key_diff, load_checkpoint, load_state_dict_strict, read_state_dict


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
