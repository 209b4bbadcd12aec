"""The download channels of `bench.fetch`: plain HTTP(S) with Range resume into a `.part` file, Hugging Face
(`huggingface_hub`, cache + resume + HF_HUB_OFFLINE), Google Drive (`gdown`), with progress bars and one-line
errors. Verifying and renaming the file into place is `bench.fetch`'s job.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request

from bench import BenchError, __version__

CHUNK = 1 << 20
TIMEOUT_S = 30.0


class SourceError(BenchError):
    """The source could not be reached or refused the request (another URL may still work)."""


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------
def part_path(weights_dir: str, file: str) -> str:
    """Where a download of `file` accumulates before it is verified: `<weights_dir>/.<file>.part`."""
    return os.path.join(weights_dir, f".{file}.part")


def _size_text(n: int | None) -> str:
    return f"{n:,} bytes" if n is not None else "size unknown"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        r = e.reason
        return _first_line(r) if isinstance(r, BaseException) else str(r)
    return _first_line(e)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _progress_bar(total: int | None, initial: int, desc: str, progress: bool):
    from tqdm import tqdm

    # disable=None: only on a terminal; progress=false: never
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if progress else True, leave=False)


def _sha256_with_progress(path: str, progress: bool) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f, _progress_bar(os.path.getsize(path), 0, "sha256", progress) as bar:
        while block := f.read(CHUNK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _probe(url: str, timeout: float = 5.0) -> None:
    """Fail fast (one line instead of minutes of retries) when the host of `url` cannot be reached."""
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise SourceError(f"cannot reach {u.hostname}:{port} ({_first_line(e)})") from e


# ---------------------------------------------------------------------------------------------------------------
# Transports: each leaves the complete file at `part` or raises; none ever writes the final name
# ---------------------------------------------------------------------------------------------------------------
def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = int(span.split("-")[0]) if span and span != "*" else None
    return start, (int(total) if total.strip().isdigit() else None)


def download_http(url: str, part: str, expected_size: int | None = None, progress: bool = True,
                  timeout: float = TIMEOUT_S, desc: str | None = None) -> None:
    """Download `url` into `part`, resuming an existing `part` with an HTTP Range request.

    Raises SourceError when the URL cannot be reached or answers an HTTP error, BenchError (the `.part` kept for
    resume) when the transfer stops early, BenchError (the `.part` removed) when the server's size disagrees
    with `expected_size`.
    """
    desc = desc or os.path.basename(part)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if expected_size is not None and have > expected_size:
        _remove(part)
        have = 0
    if expected_size is not None and have == expected_size and have > 0:
        return  # an earlier run got every byte; the caller verifies it
    for _ in range(2):  # the second round only after a resume the server could not honour
        headers = {"User-Agent": f"ovseg-bench/{__version__}"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                _, total = _content_range(e.headers.get("Content-Range"))
                if total == have:
                    return  # the .part already holds the whole file
                _remove(part)
                have = 0
                continue
            raise SourceError(f"{url} answered HTTP {e.code} {e.reason}") from e
        except ValueError as e:  # unknown url type, malformed URL
            raise SourceError(f"bad URL {url!r} ({_first_line(e)})") from e
        except OSError as e:  # URLError (DNS, refused), timeouts, RemoteDisconnected
            raise SourceError(f"cannot reach {url} ({_reason(e)})") from e
        with resp:
            if have and resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != have:
                    resp.close()
                    _remove(part)
                    have = 0
                    continue
                mode = "ab"
            else:
                have, mode = 0, "wb"  # no resume asked for, or the server ignored Range: start over
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            if expected_size is not None and total is not None and total != expected_size:
                if mode == "ab":
                    _remove(part)
                raise BenchError(f"{url} serves {_size_text(total)}, but the config expects "
                                 f"{_size_text(expected_size)}: the URL points at another file; fix url= or the "
                                 "config's checkpoint.size")
            total = total if total is not None else expected_size
            got, error = have, None
            os.makedirs(os.path.dirname(part) or ".", exist_ok=True)
            try:
                with open(part, mode) as f, _progress_bar(total, have, desc, progress) as bar:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (http.client.HTTPException, OSError) as e:   # the network: resumable
                            error = e
                            break
                        if not chunk:
                            break
                        f.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:   # a full or read-only disk: one line; what reached the .part is kept for resume
                from bench.records import write_error

                raise BenchError(f"{write_error(part, e, 'weights_dir')}; then rerun the same command to resume"
                                 ) from None
        if (total is not None and got < total) or (error is not None and total is None):
            why = _reason(error) if error is not None else "connection closed early"
            raise BenchError(f"download of {url} stopped at {_size_text(got)} of {_size_text(total)} ({why}); "
                             f"rerun the same command to resume from {part}")
        if error is not None:
            raise BenchError(f"download of {url} failed after the last byte ({_reason(error)}): rerun to verify "
                             f"{part}")
        return
    raise BenchError(f"{url} could not resume {part} twice in a row; delete it and rerun")


def download_hf(repo: str, file: str, part: str, revision: str | None = None, repo_type: str | None = None) -> str:
    """Through `huggingface_hub` (its cache, resume and HF_HUB_OFFLINE), then hard-link (or copy) into `part`.
    `repo_type` "space" for files in a Space (CAT-Seg's weights), None for a model repository.

    Returns the URL the file came from (for messages)."""
    from huggingface_hub import constants, hf_hub_download

    prefix = {"space": "spaces/", "dataset": "datasets/"}.get(repo_type or "", "")
    url = f"{constants.ENDPOINT}/{prefix}{repo}/resolve/{revision or 'main'}/{file}"
    try:
        cached = hf_hub_download(repo, file, revision=revision, repo_type=repo_type, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local cache (whatever the exception class of the version)
        cached = None
    if cached is None:
        if constants.HF_HUB_OFFLINE:
            raise SourceError(f"HF_HUB_OFFLINE is set and {repo}/{file} is not in the Hugging Face cache")
        _probe(constants.ENDPOINT)
        try:
            cached = hf_hub_download(repo, file, revision=revision, repo_type=repo_type)
        except Exception as e:  # noqa: BLE001 - network, auth, 404: one line either way
            raise SourceError(f"Hugging Face download of {url} failed ({type(e).__name__}: {_first_line(e)})") from e
    cached = os.path.realpath(cached)
    os.makedirs(os.path.dirname(part) or ".", exist_ok=True)
    _remove(part)
    try:
        os.link(cached, part)
    except OSError:
        try:
            shutil.copyfile(cached, part)
        except OSError as e:   # a full or read-only weights folder: one line, no partial copy left
            from bench.records import write_error

            _remove(part)
            raise write_error(part, e, "weights_dir") from None
    return url


def download_gdrive(file_id: str, part: str, progress: bool = True) -> None:
    """Through `gdown` (Google Drive's confirmation pages). gdown writes `<part><random>` and resumes it
    (resume=True), then moves it onto `part`."""
    import gdown

    if os.path.isfile(part):
        return  # gdown renames its own temp file onto `part` only when complete: verify that one first
    _probe("https://drive.google.com")
    os.makedirs(os.path.dirname(part) or ".", exist_ok=True)
    try:
        out = gdown.download(id=file_id, output=part, quiet=not progress, resume=True)
    except Exception as e:  # noqa: BLE001 - gdown raises its own classes (quota, permission, network)
        raise SourceError(f"gdown could not fetch Google Drive id {file_id} "
                          f"({type(e).__name__}: {_first_line(e)})") from e
    if not out or not os.path.isfile(part):
        raise SourceError(f"gdown could not fetch Google Drive id {file_id} (no file written)")


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _is_gdrive(url: str) -> bool:
    return (urllib.parse.urlsplit(url).hostname or "").endswith(("drive.google.com", "docs.google.com"))
