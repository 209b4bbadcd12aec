"""bench.fetch: a synthesized checkpoint served from 127.0.0.1, fetched through the same code path as a real one.

A tiny model is registered under a test-only builder name; its checkpoint is served in the published
`{'model': sd}` layout by a local HTTP server that honours (or ignores) Range and can cut a transfer short.
"""
import hashlib
import io
import os
from pathlib import Path
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torch import nn

from bench import BenchError
from bench import fetch
from bench.models import registry
from bench.models.checkpoint import load_checkpoint

BUILDER = "tiny_fetch_test"
FILE = "tiny.pth"


class TinyFetchModel(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.proj = nn.Linear(32, width)
        self.head = nn.Conv2d(width, 8, 1)
        self.register_buffer("attn_mask", torch.zeros(4, 4))


def _checkpoint_bytes(sd: dict, wrap: bool = True) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": sd, "iteration": 1000} if wrap else sd, buf)
    return buf.getvalue()


@pytest.fixture
def tiny(monkeypatch):
    """Registers the tiny builder (undone after the test) and returns the published bytes of a seeded model."""
    monkeypatch.setitem(registry._BUILDERS, BUILDER, lambda **kw: TinyFetchModel(**kw))
    torch.manual_seed(0)
    src = TinyFetchModel()
    return src, _checkpoint_bytes(src.state_dict())


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if rng and srv.honour_range:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = srv.cut.get(self.path)
        self.wfile.write(body if cut is None else body[:cut])  # a cut transfer: fewer bytes than announced
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.cut, srv.honour_range = {}, [], {}, True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _ck(data: bytes | None = None, **over) -> dict:
    ck = {"file": FILE, "urls": [], "size": len(data) if data is not None else None,
          "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
          "ignore_prefixes": [], "optional_keys": []}
    ck.update(over)
    return ck


def _fetch(ck, wdir, url, **kw):
    lines = []
    path = fetch.fetch_checkpoint(ck, str(wdir), builder=BUILDER, url=url, progress=False, name="tiny",
                                  say=lines.append, **kw)
    return path, lines


def _only_part_or_nothing(wdir):
    """After a failure nothing may sit at the final name (nor anywhere that looks like a checkpoint)."""
    assert not (wdir / FILE).exists()
    assert [n for n in os.listdir(wdir) if n.endswith(".pth")] == []


def test_fetch_verifies_and_renames(tmp_path, server, tiny):
    src, data = tiny
    server.files["/tiny.pth"] = data
    path, lines = _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")
    assert path == str(tmp_path / FILE) and (tmp_path / FILE).read_bytes() == data
    assert not os.path.exists(fetch.part_path(str(tmp_path), FILE))
    assert "loads strictly" in lines[-1] or "load strictly" in lines[-1]
    dst = TinyFetchModel()
    load_checkpoint(dst, path)
    assert torch.equal(dst.proj.weight, src.proj.weight)
    assert fetch.read_sums(str(tmp_path)) == {FILE: hashlib.sha256(data).hexdigest()}
    # present and verified: skipped without a request
    n = len(server.requests)
    _, lines = _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")
    assert len(server.requests) == n and "already present and verified" in lines[-1]


def test_truncated_transfer_leaves_no_final_file_and_resumes(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    server.cut["/tiny.pth"] = len(data) // 3
    url = server.url + "/tiny.pth"
    with pytest.raises(BenchError, match=r"download of .*tiny\.pth stopped at .* of .*rerun the same command") as e:
        _fetch(_ck(data), tmp_path, url)
    assert "\n" not in str(e.value) and url in str(e.value)
    _only_part_or_nothing(tmp_path)
    part = fetch.part_path(str(tmp_path), FILE)
    assert os.path.getsize(part) == len(data) // 3  # kept for the resume
    server.cut.clear()
    _fetch(_ck(data), tmp_path, url)
    assert server.requests[-1][1] == f"bytes={len(data) // 3}-"
    assert (tmp_path / FILE).read_bytes() == data and not os.path.exists(part)


def test_truncated_without_known_size_is_caught(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    server.cut["/tiny.pth"] = 100
    with pytest.raises(BenchError, match="stopped at"):
        _fetch(_ck(size=None, sha256=None), tmp_path, server.url + "/tiny.pth")
    _only_part_or_nothing(tmp_path)


def test_wrong_checksum_removes_the_download(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    with pytest.raises(BenchError, match=r"has sha256 [0-9a-f]{64}, not 0{64} \(the tiny config\); removed"):
        _fetch(_ck(data, sha256="0" * 64), tmp_path, server.url + "/tiny.pth")
    _only_part_or_nothing(tmp_path)
    assert not os.path.exists(fetch.part_path(str(tmp_path), FILE))
    # the command-line sha256= override wins over the config
    with pytest.raises(BenchError, match=r"sha256= on the command line"):
        _fetch(_ck(data), tmp_path, server.url + "/tiny.pth", sha256="f" * 64)
    _only_part_or_nothing(tmp_path)


def test_wrong_size_from_server_is_refused_before_download(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    with pytest.raises(BenchError, match=r"serves .* bytes, but the config expects"):
        _fetch(_ck(data, size=len(data) + 1), tmp_path, server.url + "/tiny.pth")
    _only_part_or_nothing(tmp_path)


@pytest.mark.parametrize("honour_range", [True, False])
def test_resumed_download(tmp_path, server, tiny, honour_range):
    src, data = tiny
    server.files["/tiny.pth"] = data
    server.honour_range = honour_range
    part = fetch.part_path(str(tmp_path), FILE)
    k = len(data) // 2
    with open(part, "wb") as f:
        f.write(data[:k])
    path, _ = _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")
    assert server.requests == [("/tiny.pth", f"bytes={k}-")]
    assert open(path, "rb").read() == data and not os.path.exists(part)
    dst = TinyFetchModel()
    load_checkpoint(dst, path)
    assert torch.equal(dst.head.weight, src.head.weight)


def test_complete_part_is_verified_without_downloading(tmp_path, server, tiny):
    _, data = tiny
    part = fetch.part_path(str(tmp_path), FILE)
    with open(part, "wb") as f:
        f.write(data)
    _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")  # server has no such file: no request is needed
    assert server.requests == [] and (tmp_path / FILE).read_bytes() == data


def test_complete_part_of_unknown_size_gets_416_and_is_verified(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    part = fetch.part_path(str(tmp_path), FILE)
    with open(part, "wb") as f:
        f.write(data)
    _fetch(_ck(), tmp_path, server.url + "/tiny.pth")
    assert server.requests == [("/tiny.pth", f"bytes={len(data)}-")]
    assert (tmp_path / FILE).read_bytes() == data


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/tiny.pth"


def test_unreachable_url_says_what_to_download_and_where(tmp_path, tiny):
    _, data = tiny
    url = _closed_port_url()
    with pytest.raises(BenchError) as e:
        _fetch(_ck(data), tmp_path, url)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot reach {url}")
    assert f"download {FILE} ({len(data):,} bytes) from {url}" in msg and f"put it at {tmp_path / FILE}" in msg
    _only_part_or_nothing(tmp_path)


def test_command_line_unreachable_is_one_line(tmp_path, tiny, capsys):
    url = _closed_port_url()
    rc = fetch.main(["model=san_b", f"model.builder={BUILDER}", f"model.checkpoint.file={FILE}",
                     f"weights_dir={tmp_path}", f"url={url}"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and err.startswith("error: cannot reach")
    assert url in err and str(tmp_path / FILE) in err


def test_command_line_fetch_through_the_composed_config(tmp_path, server, tiny, capsys):
    _, data = tiny
    server.files["/tiny.pth"] = data
    args = ["model=san_b", f"model.builder={BUILDER}", f"model.checkpoint.file={FILE}",
            "model.checkpoint.size=null", "model.checkpoint.sha256=null", "model.checkpoint.optional_keys=[]",
            f"weights_dir={tmp_path}", f"url={server.url}/tiny.pth", "progress=false"]
    assert fetch.main(args) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256(data).hexdigest()
    assert f"sha256 of {FILE}: {sha} (not published" in out  # unknown hash: shown and recorded
    assert fetch.read_sums(str(tmp_path)) == {FILE: sha}
    assert (tmp_path / FILE).read_bytes() == data
    assert fetch.main(args) == 0 and "already present and verified" in capsys.readouterr().out


def test_recorded_sha256_holds_later_downloads(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    _fetch(_ck(), tmp_path, server.url + "/tiny.pth")
    os.remove(tmp_path / FILE)
    torch.manual_seed(1)
    server.files["/tiny.pth"] = _checkpoint_bytes(TinyFetchModel().state_dict())  # upstream changed the file
    with pytest.raises(BenchError, match="recorded in .*SHA256SUMS on the first download"):
        _fetch(_ck(), tmp_path, server.url + "/tiny.pth")
    _only_part_or_nothing(tmp_path)


def test_wrong_key_layout_fails_the_strict_load(tmp_path, server, tiny):
    _, data = tiny
    other = TinyFetchModel(width=16).state_dict()
    other["stray.weight"] = torch.zeros(2)
    del other["attn_mask"]
    server.files["/other.pth"] = _checkpoint_bytes(other)
    with pytest.raises(BenchError) as e:
        _fetch(_ck(), tmp_path, server.url + "/other.pth")
    msg = str(e.value)
    assert "\n" not in msg and "fails the strict load into tiny_fetch_test" in msg
    assert "1 missing [attn_mask]" in msg and "1 unexpected [stray.weight]" in msg and "shape mismatches" in msg
    _only_part_or_nothing(tmp_path)
    assert not os.path.exists(fetch.part_path(str(tmp_path), FILE))
    assert fetch.read_sums(str(tmp_path)) == {}


def test_optional_keys_and_ignored_prefixes_follow_the_config(tmp_path, server, tiny):
    src, _ = tiny
    sd = dict(src.state_dict())
    del sd["attn_mask"]
    sd["unused.branch"] = torch.zeros(3)
    server.files["/tiny.pth"] = _checkpoint_bytes(sd)
    _, lines = _fetch(_ck(optional_keys=["attn_mask"], ignore_prefixes=["unused."]), tmp_path,
                      server.url + "/tiny.pth")
    assert "ignored 1 unused published keys" in lines[-1] and "lacks attn_mask" in lines[-1]


def test_html_instead_of_a_checkpoint_is_removed(tmp_path, server, tiny):
    server.files["/tiny.pth"] = b"<html>Google Drive can't scan this file for viruses</html>"
    with pytest.raises(BenchError, match="not a torch checkpoint"):
        _fetch(_ck(), tmp_path, server.url + "/tiny.pth")
    _only_part_or_nothing(tmp_path)
    assert not os.path.exists(fetch.part_path(str(tmp_path), FILE))


def test_http_error_names_the_url(tmp_path, server, tiny):
    url = server.url + "/missing.pth"
    with pytest.raises(BenchError, match=rf"{url} answered HTTP 404 .*put it at"):
        _fetch(_ck(), tmp_path, url)
    _only_part_or_nothing(tmp_path)


def test_present_but_different_file_is_kept_unless_forced(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    (tmp_path / FILE).write_bytes(data[:-1] + b"x")
    with pytest.raises(BenchError, match="exists but its sha256 is .*force=true"):
        _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")
    assert (tmp_path / FILE).read_bytes() != data and server.requests == []
    _fetch(_ck(data), tmp_path, server.url + "/tiny.pth", force=True)
    assert (tmp_path / FILE).read_bytes() == data


def test_unknown_builder_keeps_the_verified_download(tmp_path, server, tiny):
    _, data = tiny
    server.files["/tiny.pth"] = data
    with pytest.raises(BenchError, match="cannot build model 'no_such_builder'.*check_layout=false"):
        fetch.fetch_checkpoint(_ck(data), str(tmp_path), builder="no_such_builder",
                               url=server.url + "/tiny.pth", progress=False, say=lambda s: None)
    _only_part_or_nothing(tmp_path)
    assert os.path.getsize(fetch.part_path(str(tmp_path), FILE)) == len(data)
    fetch.fetch_checkpoint(_ck(data), str(tmp_path), builder="no_such_builder", layout=False,
                           url=server.url + "/tiny.pth", progress=False, say=lambda s: None)
    assert (tmp_path / FILE).read_bytes() == data


def test_parse_args_splits_fetch_keys_from_hydra_overrides():
    ov, opts = fetch.parse_args(["model=san_l", "weights_dir=/w", "url=http://h:1/a?b=c", "+sha256=AB",
                                 "all=false", "check_layout=false"])
    assert ov == ["model=san_l", "weights_dir=/w"]
    assert opts == {"url": "http://h:1/a?b=c", "sha256": "AB", "all": False, "check_layout": False}
    with pytest.raises(BenchError, match="unexpected argument"):
        fetch.parse_args(["--root"])
    with pytest.raises(BenchError, match="expected true or false"):
        fetch.parse_args(["all=maybe"])


def test_no_source_and_google_drive_without_gdown(tmp_path, monkeypatch):
    with pytest.raises(BenchError, match=r"no download URL for tiny\.pth .*pass url="):
        _fetch(_ck(), tmp_path, None)
    monkeypatch.setattr(fetch, "_have", lambda module: False)
    with pytest.raises(BenchError, match=r"on Google Drive: pip install '\.\[fetch\]' .*uc\?id=XYZ by hand"):
        _fetch(_ck(gdrive_id="XYZ"), tmp_path, None)
    _only_part_or_nothing(tmp_path)


def test_refused_pickle_keeps_the_download_and_names_the_opt_in(tmp_path, server, tiny):
    import argparse

    src, _ = tiny
    buf = io.BytesIO()
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=0.1)}, buf)  # a class outside the allowlist
    data = buf.getvalue()
    server.files["/tiny.pth"] = data
    with pytest.raises(BenchError, match=r"weights_only=True.*allow_unsafe_pickle=true.*\(kept .*\.tiny\.pth\.part\)"):
        _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")
    _only_part_or_nothing(tmp_path)
    n = len(server.requests)
    _fetch(_ck(data), tmp_path, server.url + "/tiny.pth", allow_unsafe_pickle=True)  # the kept .part is complete
    assert len(server.requests) == n and (tmp_path / FILE).read_bytes() == data


def test_wrong_layout_of_the_published_file_is_kept(tmp_path, server, tiny):
    data = _checkpoint_bytes(TinyFetchModel(width=16).state_dict())
    server.files["/tiny.pth"] = data
    with pytest.raises(BenchError, match="matches the expected sha256 but fails the strict load.*model code"):
        _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")
    _only_part_or_nothing(tmp_path)
    assert os.path.getsize(fetch.part_path(str(tmp_path), FILE)) == len(data)


def test_hugging_face_path_uses_the_hub_cache(tmp_path, tiny, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    _, data = tiny
    blob = tmp_path / "hub" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(data)
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("local_files_only", False)))
        return str(blob)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    wdir = tmp_path / "w"
    _fetch(_ck(data, hf_repo="someone/tiny"), wdir, None)
    assert calls == [("someone/tiny", FILE, True)] and (wdir / FILE).read_bytes() == data
    assert blob.read_bytes() == data  # the cache keeps its copy

    def not_cached(repo_id, filename, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BenchError, match=r"HF_HUB_OFFLINE is set and someone/tiny/other\.pth is not in the Hugging "
                                         r"Face cache: download other\.pth \(.* bytes\) from "
                                         r"https://huggingface\.co/someone/tiny/resolve/main/other\.pth and put it at"):
        _fetch(_ck(data, hf_repo="someone/tiny", file="other.pth"), wdir, None)
    assert not (wdir / "other.pth").exists()


def test_full_disk_during_the_download_is_one_line_and_resumable(tmp_path, server, tiny, monkeypatch):
    """A full weights disk (the .part's flush/fsync fails): one line naming the .part, the errno and the fix."""
    import errno

    _, data = tiny
    server.files["/tiny.pth"] = data

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m, pytest.raises(BenchError) as e:
        m.setattr(os, "fsync", full)
        _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None and e.value.__suppress_context__
    assert fetch.part_path(str(tmp_path), FILE) in msg and "No space left on device (ENOSPC)" in msg
    assert "set weights_dir=" in msg and msg.endswith("rerun the same command to resume")
    _only_part_or_nothing(tmp_path)
    path, _ = _fetch(_ck(data), tmp_path, server.url + "/tiny.pth")   # space again: the rerun completes
    assert (tmp_path / FILE).read_bytes() == data


def test_a_space_file_is_found_in_the_real_hub_cache_layout(tmp_path, tiny, monkeypatch):
    """CAT-Seg's weights live in a Hugging Face *Space* (`hf_repo_type: space`). The real `huggingface_hub`
    resolves the file from a hub cache laid out as it lays it out (spaces--owner--name/refs, snapshots), offline;
    the same file under a model repository's name is not found, so the repo type is what found it."""
    from huggingface_hub import constants

    _, data = tiny
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "spaces--someone--tiny-weights"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "snapshots" / commit / FILE).write_bytes(data)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    wdir = tmp_path / "w"
    path, _ = _fetch(_ck(data, hf_repo="someone/tiny-weights", hf_repo_type="space"), wdir, None)
    assert Path(path).read_bytes() == data and (repo_dir / "snapshots" / commit / FILE).read_bytes() == data
    (wdir / FILE).unlink()
    with pytest.raises(BenchError, match=r"not in the Hugging Face cache"):
        _fetch(_ck(data, hf_repo="someone/tiny-weights"), wdir, None)        # as a model repository: not there
    with pytest.raises(BenchError, match=r"https://huggingface\.co/spaces/someone/tiny-weights/resolve/main/"):
        _fetch(_ck(data, hf_repo="someone/tiny-weights", hf_repo_type="space", file="absent.pth"), wdir, None)
