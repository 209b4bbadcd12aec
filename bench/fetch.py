"""Fetch published checkpoints: `python -m bench.fetch model=san_b [weights_dir=weights] [url=...] [sha256=...]`.

`python -m bench.fetch all=true` fetches every model of `conf/model/`. The arguments are Hydra-style overrides
composed with the project's own config (`conf/config.yaml`, group `conf/model`), so `model=san_b` picks
`conf/model/san_b.yaml` exactly as `python -m bench` does. Keys only this command knows:

    url=URL            download from this URL (plain HTTP(S), resumable) instead of the config's source
    sha256=HEX         expected sha256 (overrides the config and the recorded one)
    all=true           every model config in conf/model/
    check_layout=false skip the strict load of the key layout (the file is still checked for size and sha256)

and from the main config: `weights_dir`, `force` (replace a present file by a fresh download),
`allow_unsafe_pickle`, `progress`.

Sources, in order: a `url=` override; the config's Hugging Face repo through `huggingface_hub` (cache, resume,
`HF_HUB_OFFLINE`) when installed; its Google Drive id through `gdown` when installed (`pip install '.[fetch]'`);
otherwise the config's plain `urls` over urllib with HTTP Range resume.

Every download lands in `<weights_dir>/.<file>.part`, is checked (size, sha256 when known, then a strict load
of the key layout into the model built from the config's builder on CPU) and only then renamed onto
`<weights_dir>/<file>`. A failed or partial download never leaves a file at the final name: an interrupted
transfer keeps the `.part` for the next run to resume; a file of the wrong size or hash, or one of unknown hash
that is no checkpoint of the model, is removed (a file whose hash matches but whose load fails, or one that
`weights_only=True` refuses, is kept for the rerun with fixed code or `allow_unsafe_pickle=true`). A sha256 that
no config publishes is computed, printed and recorded in `<weights_dir>/SHA256SUMS` (sha256sum format), and
later downloads of that file are held to it. Errors are one line (`BenchError`); exit status 0 ok, 2 failure.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from bench import BenchError
from bench.cli import error, parse_overrides
from bench.download import (SourceError, _first_line, _have, _is_gdrive, _remove,  # noqa: F401
                            _sha256_with_progress, _size_text, download_gdrive, download_hf, download_http, part_path)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SUMS_FILE = "SHA256SUMS"
FETCH_KEYS = {"url": str, "sha256": str, "all": bool, "check_layout": bool}   # this command's own keys

USAGE = ("usage: python -m bench.fetch [model=NAME] [weights_dir=DIR] [url=URL] [sha256=HEX] [all=true] "
         "[force=true] [check_layout=false] [other Hydra overrides of conf/config.yaml]")


def read_sums(weights_dir: str) -> dict[str, str]:
    """`<weights_dir>/SHA256SUMS` as {file: sha256} (sha256sum format: `<hex>  <file>`)."""
    sums: dict[str, str] = {}
    try:
        with open(os.path.join(weights_dir, SUMS_FILE)) as f:
            for line in f:
                parts = line.strip().split(maxsplit=1)
                if len(parts) == 2 and len(parts[0]) == 64:
                    sums[parts[1].lstrip("*")] = parts[0].lower()
    except FileNotFoundError:
        pass
    return sums


def record_sum(weights_dir: str, file: str, sha256: str) -> None:
    """Add/replace the line of `file` in SHA256SUMS (written atomically)."""
    sums = read_sums(weights_dir)
    if sums.get(file) == sha256:
        return
    sums[file] = sha256
    from bench.records import atomic_write   # here, not at the top: `bench.records` imports torch

    atomic_write(os.path.join(weights_dir, SUMS_FILE), "".join(f"{h}  {name}\n" for name, h in sorted(sums.items())),
                 setting="weights_dir")


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------
def build_cpu_model(builder: str, builder_kwargs: Mapping | None = None):
    """The model of `builder` on CPU (random init), importing the model families if it is not registered yet."""
    import importlib
    import pkgutil

    import bench.models as models
    from bench.models.registry import create_model, list_models

    if builder not in list_models():
        for info in pkgutil.iter_modules(models.__path__):
            if info.name not in ("registry", "checkpoint", "base", "clip"):
                try:
                    importlib.import_module(f"bench.models.{info.name}")
                except Exception:  # noqa: BLE001 - a family under construction must not hide the others
                    continue
    return create_model(builder, **dict(builder_kwargs or {}))


# ---------------------------------------------------------------------------------------------------------------
# One checkpoint
# ---------------------------------------------------------------------------------------------------------------
def fetch_checkpoint(checkpoint: Mapping, weights_dir: str = "weights", *, builder: str | None = None,
                     builder_kwargs: Mapping | None = None, url: str | None = None, sha256: str | None = None,
                     force: bool = False, layout: bool = True, allow_unsafe_pickle: bool = False,
                     progress: bool = True, name: str | None = None,
                     say: Callable[[str], None] = print) -> str:
    """Fetch and verify one checkpoint described by a config's `checkpoint:` table; returns the final path.

    `checkpoint` has `file` and optionally `urls`, `hf_repo`, `gdrive_id`, `size`, `sha256`, `ignore_prefixes`,
    `optional_keys`, `page` (where to get it by hand when there is no URL). `url` overrides the source (plain
    HTTP(S) with Range resume), `sha256` the expected hash (else the config's, else the one in SHA256SUMS).
    `builder` (+ `builder_kwargs`) is the registered model the key layout must load into strictly (skipped when
    `layout` is false or `builder` is None). Raises BenchError (one line) on any failure; the final name is only
    ever written by an `os.replace` of a verified `.part`.
    """
    file = checkpoint["file"]
    name = name or file
    size = checkpoint.get("size")
    size = int(size) if size is not None else None
    final = os.path.join(weights_dir, file)
    part = part_path(weights_dir, file)
    sums_path = os.path.join(weights_dir, SUMS_FILE)
    recorded = read_sums(weights_dir).get(file)
    if sha256:
        want, want_from = sha256.lower(), "sha256= on the command line"
    elif checkpoint.get("sha256"):
        want, want_from = str(checkpoint["sha256"]).lower(), f"the {name} config"
    elif recorded:
        want, want_from = recorded, f"recorded in {sums_path} on the first download"
    else:
        want, want_from = None, ""
    if want is not None and (len(want) != 64 or any(c not in "0123456789abcdef" for c in want)):
        raise BenchError(f"sha256 {want!r} ({want_from}) is not 64 hex digits")
    cmd = f"python -m bench.fetch model={name}" if name != file else "python -m bench.fetch"
    if os.path.normpath(weights_dir) != "weights":
        cmd += f" weights_dir={weights_dir}"

    def verify_layout(path: str, origin: str, hash_known: bool) -> str:
        """Strict load of the key layout into a fresh CPU model; '' when not asked for. A file that is no
        checkpoint of this model is removed when it is a `.part` of unknown hash (nothing worth resuming)."""
        if not (layout and builder):
            return ""
        here = f"removed {part}" if path == part else f"kept {path}"
        with open(path, "rb") as f:
            head = f.read(64)
        if not head.startswith((b"PK", b"\x80")):  # neither torch's zip format nor a legacy pickle
            if path == part:
                _remove(part)
            shown = head[:24].decode("latin-1").encode("unicode_escape").decode()
            raise BenchError(f"{file} from {origin} is not a torch checkpoint (it starts with {shown!r}: an error, "
                             f"login or virus-scan page?); {here}")
        try:
            model = build_cpu_model(builder, builder_kwargs)
        except BenchError as e:
            raise BenchError(f"cannot build model {builder!r} to check the key layout of {file} ({e}); the "
                             f"download stays at {path}: rerun when the builder exists, or pass check_layout=false"
                             ) from e
        from bench.models.checkpoint import PickleRefused, load_state_dict_strict, read_state_dict

        try:
            sd = read_state_dict(path, allow_unsafe_pickle)
            report = load_state_dict_strict(model, sd, file, tuple(checkpoint.get("ignore_prefixes") or ()),
                                            tuple(checkpoint.get("optional_keys") or ()))
        except BenchError as e:
            refused = isinstance(e, PickleRefused)
            if hash_known and not refused:
                raise BenchError(f"{file} from {origin} matches the expected sha256 but fails the strict load into "
                                 f"{builder}: {e}; the model code does not fit the published file (kept {path})"
                                 ) from e
            if path == part and not refused:
                _remove(part)
            else:
                here = f"kept {path}"
            raise BenchError(f"{file} from {origin} fails the strict load into {builder}: {e} ({here})") from e
        note = report.note()
        return f"{len(sd)} keys load strictly into {builder}" + (f"; {note}" if note else "")

    # ---- already there?
    if os.path.exists(final) and not force:
        have = os.path.getsize(final)
        if size is not None and have != size:
            raise BenchError(f"{final} exists but holds {_size_text(have)}, not {_size_text(size)}: move it away, "
                             f"or rerun with force=true to replace it with a verified download")
        got = _sha256_with_progress(final, progress)
        if want is not None and got != want:
            raise BenchError(f"{final} exists but its sha256 is {got}, not {want} ({want_from}): move it away, or "
                             "rerun with force=true to replace it with a verified download")
        if want is None:  # nothing to compare with: the strict load is the check, then record the hash
            detail = verify_layout(final, final, hash_known=False)
            record_sum(weights_dir, file, got)
            say(f"ok: {final} already present ({_size_text(have)}; {detail or 'layout not checked'}); "
                f"sha256 {got} recorded in {sums_path}")
        else:
            say(f"ok: {final} already present and verified ({_size_text(have)}, sha256 {got[:12]}…)")
        return final

    # ---- download into the .part
    origin = _download(checkpoint, file, final, part, size, url, progress, cmd, name)

    # ---- verify: size, sha256, key layout
    have = os.path.getsize(part)
    if size is not None and have != size:
        _remove(part)
        raise BenchError(f"{file} from {origin} has {_size_text(have)}, not {_size_text(size)}; removed {part}: "
                         "rerun to download again")
    got = _sha256_with_progress(part, progress)
    if want is not None and got != want:
        _remove(part)
        raise BenchError(f"{file} from {origin} has sha256 {got}, not {want} ({want_from}); removed {part}: rerun "
                         "to download again (or fix url=/sha256=)")
    detail = verify_layout(part, origin, hash_known=want is not None)
    os.replace(part, final)
    record_sum(weights_dir, file, got)
    if want is None:
        say(f"sha256 of {file}: {got} (not published in the config; recorded in {sums_path})")
    say(f"ok: {final} ({_size_text(have)}, sha256 {got[:12]}…" + (f"; {detail})" if detail else ")"))
    return final


def _download(checkpoint: Mapping, file: str, final: str, part: str, size: int | None, url: str | None,
              progress: bool, cmd: str, name: str) -> str:
    """Pick the source and leave the file at `part`; returns where it came from. One-line errors with the fix."""
    urls = [url] if url else [str(u) for u in (checkpoint.get("urls") or [])]
    hf_repo, gdrive_id = checkpoint.get("hf_repo"), checkpoint.get("gdrive_id")
    where = f"{file} ({_size_text(size)})" if size is not None else file
    put = f"put it at {final}, then rerun `{cmd}` to verify it"
    conf = f"conf/model/{name}.yaml" if name != file else "the model config"

    if not url and hf_repo and _have("huggingface_hub"):
        try:
            return download_hf(str(hf_repo), file, part, repo_type=checkpoint.get("hf_repo_type"))
        except SourceError as e:
            space = "spaces/" if checkpoint.get("hf_repo_type") == "space" else ""
            src = urls[0] if urls else f"https://huggingface.co/{space}{hf_repo}/resolve/main/{file}"
            raise BenchError(f"{e}: download {where} from {src} and {put}") from e

    if not url and (gdrive_id or any(_is_gdrive(u) for u in urls)):
        drive_url = (f"https://drive.google.com/uc?id={gdrive_id}" if gdrive_id
                     else next(u for u in urls if _is_gdrive(u)))
        if not _have("gdown"):
            raise BenchError(f"{file} is on Google Drive: pip install '.[fetch]' (gdown) and rerun, or download it "
                             f"from {drive_url} by hand and {put}")
        gid = gdrive_id or urllib.parse.parse_qs(urllib.parse.urlsplit(drive_url).query).get("id", [""])[0]
        try:
            download_gdrive(str(gid), part, progress)
            return drive_url
        except SourceError as e:
            raise BenchError(f"{e}: download {where} from {drive_url} by hand and {put}") from e

    if not urls:
        page = checkpoint.get("page")
        src = f"from {page}" if page else f"from the official release named in {conf}"
        raise BenchError(f"no download URL for {file} (checkpoint.urls is empty in {conf}): download it {src} "
                         f"by hand and {put}, or pass url=...")
    errors = []
    for u in urls:
        try:
            download_http(u, part, size, progress, desc=file)
            return u
        except SourceError as e:
            errors.append(str(e))
    raise BenchError(f"{'; '.join(errors)}: download {where} from {urls[0]} by hand and {put}")


# ---------------------------------------------------------------------------------------------------------------
# Config and command line
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[list[str], dict]:
    """Split `key=value` arguments into Hydra overrides of conf/config.yaml and this command's own keys."""
    opts, overrides = parse_overrides(argv, FETCH_KEYS, USAGE,
                                      passthrough=lambda a: "=" in a or a.startswith("~"))
    return overrides, {"url": None, "sha256": None, "all": False, "check_layout": True, **opts}


def model_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def compose_configs(overrides: list[str], every_model: bool = False) -> list:
    """The resolved project config for each model asked for, composed as `python -m bench` would."""
    from hydra import compose, initialize_config_dir

    import bench.config  # noqa: F401  (registers the typed schema)
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if every_model:
        overrides = [o for o in overrides if o.partition("=")[0].lstrip("+") != "model"]
        runs = [overrides + [f"model={m}"] for m in model_names()]
    else:
        runs = [overrides]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    cfgs = []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="fetch"):
            for ov in runs:
                cfgs.append(compose(config_name="config", overrides=ov))
    except (HydraException, OmegaConfBaseException) as e:
        raise BenchError(f"bad overrides {' '.join(overrides)!r}: {_first_line(e)}") from e
    return cfgs


def fetch_model(cfg, url: str | None = None, sha256: str | None = None, layout: bool = True,
                say: Callable[[str], None] = print) -> str:
    """Fetch the checkpoint of the composed config `cfg` (its `model.checkpoint` table) into `cfg.weights_dir`."""
    from omegaconf import OmegaConf

    m = cfg.model
    ck = OmegaConf.to_container(m.checkpoint, resolve=True)
    kwargs = m.get("builder_kwargs")
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if kwargs is not None else {}
    return fetch_checkpoint(ck, str(cfg.weights_dir), builder=m.get("builder"),
                            builder_kwargs=kwargs,
                            url=url, sha256=sha256, force=bool(cfg.get("force", False)), layout=layout,
                            allow_unsafe_pickle=bool(cfg.get("allow_unsafe_pickle", False)),
                            progress=bool(cfg.get("progress", True)), name=str(m.get("name") or ck["file"]),
                            say=say)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE)
        return 0
    try:
        overrides, opts = parse_args(argv)
        if opts["all"] and (opts["url"] or opts["sha256"]):
            raise BenchError("url= and sha256= name one file: use them with model=NAME, not with all=true")
        cfgs = compose_configs(overrides, opts["all"])
    except BenchError as e:
        return error(e)
    failed = 0
    for cfg in cfgs:
        try:
            fetch_model(cfg, opts["url"], opts["sha256"], opts["check_layout"])
        except BenchError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"error: interrupted; rerun the same command to resume the .part in {cfg.weights_dir}",
                  file=sys.stderr)
            return 130
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
