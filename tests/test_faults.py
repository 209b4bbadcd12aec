"""Fault tolerance and hostile inputs (issue "Survive faults" + "Hostile inputs"), end to end through the real CLI
(`python -m bench ...` in a subprocess) on the test-only tiny SAN (tests/fixtures/conf/model/san_tiny.yaml: the
san_b code path at small widths, clarifications §16) and the generated synthetic dataset.

- `test_kill9_sweep_keeps_finished_cells`: kill -9 a 12-cell sweep at seeded random points, rerun the same command;
  finished cells are kept byte-identical and never recomputed, no cell is duplicated, runs.csv always parses. It
  prints its figures (run `pytest -s tests/test_faults.py -k kill9`) for the README.
- `test_killed_cell_*`: a cell killed mid-run / a record killed mid-write leaves no record or a complete one; a killed
  isolated cell becomes an error record (never a result) and is recomputed by the rerun.
- `test_each_cell_runs_in_a_fresh_process`: peak memory does not leak from one cell of a sweep into the next.
- `test_failing_cell_in_the_middle_of_a_sweep`: every other cell completes, the leaderboard shows the failure with
  its reason, and the command exits non-zero only after aggregation.
- `test_hostile_input`: one CLI run per row of `HOSTILE_CASES` (the table for the README), each next to an ok record
  computed before, which must come out untouched.

Everything is written under pytest's tmp dirs; hostile files are built by the tests themselves.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.config import RUN_KEYS
from bench.records import load_records

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SEARCHPATH = f"hydra.searchpath=[file://{ROOT / 'tests' / 'fixtures' / 'conf'}]"
TINY = [SEARCHPATH, "model=san_tiny", "dataset=synthetic", "profile.warmup=0", "profile.iters=1",
        "profile.peak_size=256", "profile.vocabulary=synthetic8.txt", "progress=false"]   # 256-px peak probe: fast
SYNTH_IMAGES = "ovseg_synthetic/images/validation"
SYNTH_LABELS = "ovseg_synthetic/annotations_detectron2/validation"


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)  # Hydra's short error output is what a user sees
    return env


def bench_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *args]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(bench_cmd(*args), cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=timeout)


def record_files(results: Path) -> dict[str, Path]:
    """name -> path of the record files (`<key>.json`; not temp files, not `.timings.json`)."""
    runs = results / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: p for p in runs.iterdir()
            if p.name.endswith(".json") and not p.name.startswith(".") and not p.name.endswith(".timings.json")}


def snapshot(results: Path) -> dict[str, tuple[int, bytes, str | None]]:
    """name -> (mtime_ns, bytes, status) of every record."""
    out = {}
    for name, p in record_files(results).items():
        data = p.read_bytes()
        out[name] = (p.stat().st_mtime_ns, data, json.loads(data).get("status"))
    return out


def assert_runs_dir_clean(results: Path, n_classes: int = 8) -> int:
    """Every file under runs/ is a complete record (parses, has key + status), or a complete timings file of a
    record that exists, or a dot-temp file (ignored by load_records). Returns the number of temp files."""
    runs = results / "runs"
    temps = 0
    for p in (runs.iterdir() if runs.is_dir() else ()):
        if p.name.startswith("."):
            temps += p.name.startswith(".tmp-")
            continue
        obj = json.loads(p.read_text())  # raises on a partial file
        assert isinstance(obj, dict), p
        if p.name.endswith(".timings.json"):
            assert (runs / p.name.replace(".timings.json", ".json")).is_file(), f"timings without a record: {p}"
        else:
            assert obj.get("key") == p.stem and obj.get("status") in ("ok", "error", "missing"), p
            if obj["status"] == "ok":
                assert isinstance(obj.get("mIoU"), float) and len(obj.get("per_class", [])) == n_classes, p
            else:
                assert "mIoU" not in obj and obj.get("reason"), p
    return temps


def assert_runs_csv_matches(results: Path) -> None:
    import pandas as pd

    df = pd.read_csv(results / "runs.csv")
    recs = load_records(str(results))
    assert len(df) == len(recs) and df["key"].is_unique, (len(df), len(recs))
    assert sorted(df["key"]) == sorted(r["key"] for r in recs)


def _kill_group(proc: subprocess.Popen) -> bool:
    """kill -9 the process group of `proc` (started with start_new_session=True); True if it was still running."""
    if proc.poll() is not None:
        return False
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------------- kill -9 sweeps
SWEEP_AXES = ["resolution=32,48,64,80", "seed=0,1,2"]  # 4 x 3 = 12 cells; both are result keys
N_CELLS = 12
MIN_KILLS = 10    # trials go on until this many runs were killed (a run may also finish before its kill time)
MAX_TRIALS = 40


@pytest.mark.slow
def test_kill9_sweep_keeps_finished_cells(tmp_path):
    """At least 10 kill -9 trials over a 12-cell sweep (isolate=false: one process; the whole group is killed;
    profile.enabled=false: the FLOP count and latency loop would triple each cell's time on CPU and are not under
    test here; records, the profile cache, the dataset and the tables are written as usual).

    After each kill: every file under runs/ is complete, runs.csv (if the killed run left one) parses, and a rebuilt
    runs.csv has one row per record with unique keys. The next trial reruns the same command: every ok record that
    existed before it is still there with the same bytes and mtime (kept, not recomputed). When all 12 cells are ok
    the sweep starts over in a fresh results dir and data root (so kills also land in the dataset generation). The
    records of every completed sweep equal those of an uninterrupted run (the calibration run)."""
    from bench.leaderboard import build_leaderboard

    assert not {"resolution", "seed"} & set(RUN_KEYS)
    rng = random.Random(20261124)
    logs = tmp_path / "logs"
    logs.mkdir()
    runs_started = 0

    def start(gen: int) -> subprocess.Popen:
        nonlocal runs_started
        runs_started += 1
        args = ["-m", *TINY, "synthesize_weights=true", "isolate=false", "profile.enabled=false", *SWEEP_AXES,
                f"results_dir={tmp_path / f'results{gen}'}", f"data_root={tmp_path / f'data{gen}'}",
                f"hydra.sweep.dir={tmp_path / 'sweeps' / str(runs_started)}"]
        log = open(logs / f"{runs_started}.log", "w")
        proc = subprocess.Popen(bench_cmd(*args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
        log.close()
        return proc

    def log_tail() -> str:
        return (logs / f"{runs_started}.log").read_text()[-3000:]

    def results_of(results: Path) -> dict[str, tuple]:
        return {r["key"]: (r["config"]["resolution"], r["config"]["seed"], r["mIoU"], r["mIoU_v06"],
                           json.dumps(r["per_class"])) for r in load_records(str(results)) if r["status"] == "ok"}

    # calibration: one uninterrupted sweep (the reference records, and when cells finish)
    t0 = time.monotonic()
    proc = start(0)
    seen: list[float] = []
    while proc.poll() is None:
        n = len(record_files(tmp_path / "results0"))
        if n > len(seen):
            seen += [time.monotonic() - t0] * (n - len(seen))
        time.sleep(0.02)
    t_full = time.monotonic() - t0
    assert proc.returncode == 0, log_tail()
    reference = results_of(tmp_path / "results0")
    assert len(reference) == N_CELLS and len({(v[0], v[1]) for v in reference.values()}) == N_CELLS
    t_first = seen[0]
    t_cell = max((seen[-1] - seen[0]) / (N_CELLS - 1), 0.05)

    fig = Counter()
    gen = 1
    while fig["kills"] < MIN_KILLS and fig["trials"] < MAX_TRIALS:
        results = tmp_path / f"results{gen}"
        before = snapshot(results)
        ok_before = {n for n, v in before.items() if v[2] == "ok"}
        remaining = N_CELLS - len(ok_before)
        # startup (imports, Hydra) takes most of t_first; then aim anywhere over the remaining cells + the rebuild
        delay = rng.uniform(0.8, 1.0) * t_first + rng.uniform(0.0, remaining + 1.5) * t_cell
        proc = start(gen)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
        killed = _kill_group(proc)
        fig["trials"] += 1
        fig["kills"] += killed
        if not killed:
            assert proc.returncode == 0, log_tail()
        after = snapshot(results)
        fig["temp files left by kills (ignored)"] += assert_runs_dir_clean(results)
        if (results / "runs.csv").exists():  # written by an earlier run's end-of-sweep rebuild: must parse
            import pandas as pd

            pd.read_csv(results / "runs.csv")
        for name in ok_before:
            assert name in after and after[name][2] == "ok", f"ok record lost: {name}"
            assert after[name][:2] == before[name][:2], f"ok record recomputed: {name}"
        fig["ok records carried into a rerun, found untouched"] += len(ok_before)
        ok_after = {n for n, v in after.items() if v[2] == "ok"}
        fig["cells computed"] += len(ok_after - ok_before)
        if killed:  # where the kill landed
            where = ("before the run finished a new cell" if ok_after == ok_before
                     else "during the end-of-sweep rebuild" if len(ok_after) == N_CELLS else "between/inside cells")
            fig[f"kills {where}"] += 1
        cells = [(r["config"]["resolution"], r["config"]["seed"]) for r in load_records(str(results))]
        assert len(cells) == len(set(cells)) <= N_CELLS, "duplicated cell"
        if after:
            build_leaderboard(str(results))
            assert_runs_csv_matches(results)
        if len(ok_after) == N_CELLS:
            assert results_of(results) == reference  # resumed sweep == uninterrupted sweep
            fig["sweeps completed"] += 1
            gen += 1
    results = tmp_path / f"results{gen}"
    if record_files(results):  # the last kill's survivors: one uninterrupted rerun finishes the sweep
        before = snapshot(results)
        proc = start(gen)
        assert proc.wait(timeout=600) == 0, log_tail()
        after = snapshot(results)
        for name, v in before.items():
            if v[2] == "ok":
                assert after[name][:2] == v[:2], f"ok record recomputed: {name}"
                fig["ok records carried into a rerun, found untouched"] += 1
        assert results_of(results) == reference
        fig["cells computed"] += N_CELLS - sum(v[2] == "ok" for v in before.values())
        fig["sweeps completed"] += 1
    fig["cells recomputed"] = 0  # asserted above for every run
    fig["records lost"] = 0
    fig["wall seconds"] = round(time.monotonic() - t0)
    print(f"\nkill -9 figures (12-cell sweep, calibration run {t_full:.1f} s, first record at {t_first:.1f} s, "
          f"{t_cell:.2f} s per cell): " + ", ".join(f"{k}: {v}" for k, v in fig.items()))
    assert fig["kills"] >= MIN_KILLS, fig


# ---------------------------------------------------------------------------------------------------- killed cells
_CELL_LOOP = textwrap.dedent("""
    import json, sys
    from hydra import compose, initialize_config_dir

    import bench.config  # noqa: F401  (registers the typed schema)
    from bench.cell import run_cell
    conf, overrides = sys.argv[1], json.loads(sys.argv[2])
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        print("ready", flush=True)
        for i in range(40):
            cfg = compose("config", overrides=overrides + [f"seed={i}"])
            print(f"start {i}", flush=True)
            run_cell(cfg)
            print(f"done {i}", flush=True)
""")

_WRITE_LOOP = textwrap.dedent("""
    import json, sys
    from bench.records import atomic_write, read_record
    rec, folder = read_record(sys.argv[1]), sys.argv[2]
    rec["per_class"] = rec["per_class"] * 2000   # ~1.5 MB, serialised inside the write: kills land mid-write
    print("ready", flush=True)
    for i in range(100000):
        rec["key"] = f"k{i:05d}"
        atomic_write(f"{folder}/runs/k{i:05d}.json", lambda f: f.write(json.dumps(rec, indent=1).encode()))
""")


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} from the child in {timeout} s")


def _python(code: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=_env(), start_new_session=True)


@pytest.mark.slow
def test_killed_cell_leaves_no_partial_record(tmp_path):
    """kill -9 an in-process cell loop (run_cell, isolate=false, seeds 0, 1, ...: one record each) at a random point
    of a cell: every record on disk is complete and ok, and the cell in flight has no record or a complete one. Then
    kill a loop that does nothing but atomic record writes (~1.5 MB each), so the kills land mid-write: every record
    file is complete (only dot-temp files may be left, which load_records ignores)."""
    rng = random.Random(7)
    overrides = [*TINY, "synthesize_weights=true", "isolate=false", "resolution=32", "profile.enabled=false",
                 f"results_dir={tmp_path / 'results'}", f"data_root={tmp_path / 'data'}"]   # no FLOPs: not under test
    for trial in range(3):
        log = tmp_path / f"cells{trial}.log"
        proc = _python(_CELL_LOOP, str(CONF), json.dumps(overrides), log=log)
        # kill inside a computed cell: let 2 or 3 cells finish after the ones done earlier (skipped now), then kill
        # at a random point of the next one (scaled by the last cell's duration; the first one of a process is slower)
        target = len(load_records(str(tmp_path / "results"))) + rng.randint(2, 3)
        seen: dict[str, float] = {}
        while f"done {target - 1}" not in seen:
            assert proc.poll() is None, log.read_text()
            now = time.monotonic()
            for ln in log.read_text().splitlines():
                if ln.startswith(("start ", "done ")):
                    seen.setdefault(ln, now)
            time.sleep(0.01)
        t_cell = seen[f"done {target - 1}"] - seen[f"start {target - 1}"]
        time.sleep(rng.uniform(0.0, 1.0) * t_cell)
        assert _kill_group(proc), log.read_text()
        assert_runs_dir_clean(tmp_path / "results")
        marks = re.findall(r"^(start|done) (\d+)$", log.read_text(), flags=re.M)
        started = [int(i) for k, i in marks if k == "start"]
        done = {int(i) for k, i in marks if k == "done"}
        recs = {r["config"]["seed"]: r for r in load_records(str(tmp_path / "results"))}
        assert all(r["status"] == "ok" for r in recs.values())
        assert done <= set(recs)
        flight = [s for s in started if s not in done]
        assert set(recs) <= done | set(flight)  # the cell in flight: no record, or a complete one (checked above)

    writes = tmp_path / "writes"
    (writes / "runs").mkdir(parents=True)
    some = next(iter(record_files(tmp_path / "results").values()))
    mid_write = 0
    for trial in range(12):   # at least 3 kills, and until one has landed inside a write (the window is short)
        if trial >= 3 and mid_write:
            break
        log = tmp_path / f"writes{trial}.log"
        temps_before = assert_runs_dir_clean(writes, n_classes=16000)
        proc = _python(_WRITE_LOOP, str(some), str(writes), log=log)
        _wait_for_line(log, "ready", proc)
        time.sleep(rng.uniform(0.2, 1.5))
        assert _kill_group(proc), log.read_text()
        # every k*.json parses completely (~1.5 MB each); a kill mid-write leaves only a dot-temp file
        mid_write += assert_runs_dir_clean(writes, n_classes=16000) - temps_before
        assert all(len(r["per_class"]) == 16000 for r in load_records(str(writes)))
    print(f"\nkilled cells: 3 cell-loop kills, {trial} write-loop kills ({mid_write} landed mid-write), 0 partial records")
    assert mid_write >= 1  # the write loop spends most of its time inside a write: kills do land there


@pytest.mark.slow
def test_killed_isolated_cell_becomes_an_error_record_then_reruns(tmp_path):
    """Default isolate=true: kill -9 only the cell's own process (`python -m bench.cell`) while it starts up or runs
    (0.2-1.5 s after it appears; it needs longer than that to import torch and run the cell). The parent writes an
    error record naming the exit code (never a result: no mIoU), rebuilds the leaderboard, exits non-zero; the same
    command run again recomputes that cell to ok."""
    args = [*TINY, "synthesize_weights=true", "resolution=32", "profile.enabled=false",
            f"results_dir={tmp_path / 'results'}", f"data_root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"]
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(bench_cmd(*args), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    child = None
    end = time.monotonic() + 300
    while child is None and time.monotonic() < end and proc.poll() is None:
        child = _find_child(proc.pid, "bench.cell")
        time.sleep(0.02)
    assert child is not None, log.read_text()
    time.sleep(random.Random(3).uniform(0.2, 1.5))
    os.kill(child, signal.SIGKILL)
    assert proc.wait(timeout=300) == 1, log.read_text()
    out = log.read_text()
    assert "cell process died with exit code -9" in out and "Traceback" not in out, out
    rec = load_records(str(tmp_path / "results"))
    assert len(rec) == 1 and rec[0]["status"] == "error" and "mIoU" not in rec[0]
    import pandas as pd

    runs = pd.read_csv(tmp_path / "results" / "runs.csv")
    assert list(runs["status"]) == ["error"] and runs["mIoU"].isna().all()
    assert "died with exit code -9" in (tmp_path / "results" / "leaderboard.md").read_text()
    again = cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    rec = load_records(str(tmp_path / "results"))
    assert len(rec) == 1 and rec[0]["status"] == "ok"


def _find_child(pgid: int, needle: str) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and needle in cmdline and int(d.name) != pgid:
            return int(d.name)
    return None


# ---------------------------------------------------------------------------------------------------- fresh process
@pytest.mark.slow
def test_each_cell_runs_in_a_fresh_process(tmp_path):
    """isolate=true (the default): a 1024-px cell, then a 32-px cell in the same sweep. On CPU peak memory is the
    process's ru_maxrss, which never decreases inside a process: had the 32-px cell run in the sweep's process (or in
    the big cell's), its peak would be >= the big cell's (with isolate=false both read ~1.5 GB at 512 px vs 32 px).
    It reads far lower, so it ran in a fresh process. (On CUDA the figure is max_memory_allocated, reset per cell.)"""
    out = cli("-m", *TINY, "synthesize_weights=true", "max_images=1", "resolution=1024,32",
              f"results_dir={tmp_path / 'results'}", f"data_root={tmp_path / 'data'}",
              f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 0, out.stdout + out.stderr
    order = [int(m) for m in re.findall(r"\[ok\] san_tiny/synthetic@(\d+)", out.stdout)]
    assert order == [1024, 32]  # the big cell ran first
    peak = {r["resolution"]: r["peak_mem_mb"] for r in load_records(str(tmp_path / "results"))}
    kinds = {r["peak_mem_kind"] for r in load_records(str(tmp_path / "results"))}
    assert len(kinds) == 1
    assert peak[32] < 0.9 * peak[1024], peak


# ---------------------------------------------------------------------------------------------------- failing cell
def _truncate(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])


def test_failing_cell_in_the_middle_of_a_sweep(tmp_path, tiny_weights):
    """Tiny-model variant of test_cell's sweep test (isolate=false): 4 cells in the order ok, broken, ok, broken,
    where "broken" is `model.checkpoint.file` pointing at a truncated copy of the checkpoint."""
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_weights / "san_tiny.pth", weights / "san_tiny.pth")
    _truncate(tiny_weights / "san_tiny.pth", weights / "broken.pth")
    results = tmp_path / "results"
    out = cli("-m", *TINY, "isolate=false", "resolution=32", "max_images=3,4", "profile.enabled=false",
              "model.checkpoint.file=san_tiny.pth,broken.pth", f"weights_dir={weights}", f"results_dir={results}",
              f"data_root={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.findall(r"^\[(ok|error)\] ", out.stdout, flags=re.M) == ["ok", "error", "ok", "error"], out.stdout
    # exit only after aggregation: the sweep summary is the last line, the tables are written
    assert out.stdout.strip().splitlines()[-1].startswith("sweep: 4 cells, 2 failed; leaderboard rebuilt"), out.stdout
    recs = load_records(str(results))
    assert sorted((r["config"]["model"]["checkpoint"]["file"], r["status"]) for r in recs) == \
        [("broken.pth", "error")] * 2 + [("san_tiny.pth", "ok")] * 2
    for r in recs:
        if r["status"] == "error":
            assert "is truncated or corrupt" in r["reason"] and str(weights / "broken.pth") in r["reason"]
    assert_runs_csv_matches(results)
    md = (results / "leaderboard.md").read_text()
    assert md.count("is truncated or corrupt") >= 2


# ---------------------------------------------------------------------------------------------------- hostile inputs
# (case, what happens, message fragment). Every case: one CLI run (single cell, the tiny SAN on the synthetic set at
# resolution 32, isolate=false unless said otherwise) in a results dir that already holds an ok record (resolution
# 48), which must come out byte-identical. "error": a status=error record whose one-line reason holds the fragment
# and names the file, printed once, exit 1. "converted"/"read": status ok, exit 0. "refused": Hydra stops before any
# cell (exit 1), its first line names the bad key or value.
HOSTILE_CASES = [
    ("truncated checkpoint", "error: download it again", "is truncated or corrupt"),
    ("zip that is not a checkpoint", "error: download it again", "is not a torch checkpoint: a zip archive"),
    ("random bytes named like the checkpoint", "error: download it again, no unsafe opt-in offered",
     "is not a torch checkpoint (unrecognised bytes)"),
    ("pickle that runs code (__reduce__ -> os.system)", "error: refused by weights_only=True, the code never runs",
     "rerun with allow_unsafe_pickle=true"),
    ("another model's checkpoint (SimSeg keys)", "error: the key diff", "does not match SAN"),
    ("NaN weights", "error instead of an mIoU", "non-finite outputs"),
    ("0-byte image", "error", "is empty (0 bytes)"),
    ("CMYK JPEG image", "converted to RGB, evaluated", ""),
    ("greyscale JPEG image", "converted to RGB, evaluated", ""),
    ("16-bit greyscale image", "scaled to 8 bits, RGB, evaluated", ""),
    ("label of another size than its image", "error", "labels must have the image's size"),
    ("palette (mode P) label PNG", "read as indices: same result as the plain label", ""),
    ("class-name file with blank lines", "blank lines skipped: same result as the plain file", ""),
    ("class-name file with a duplicate line", "error", "duplicate"),
    ("results_dir on a path that cannot be created (/proc/...)", "error, default isolate=true",
     "cannot write results under"),
    ("config key typo (presicion=fp32)", "refused by Hydra", "Could not override 'presicion'"),
    ("unknown model (model=san_x)", "refused by Hydra, lists the valid ones", "Could not find 'model/san_x'"),
]
XFAIL: dict[str, str] = {}  # cases that expose a known bug (none open)


def _slug(case: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", case.lower()).strip("-")[:40]


class Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def hostile_base(tmp_path_factory, tiny_weights) -> dict:
    """A clean synthetic dataset, a results dir holding one ok record (resolution 48) plus the profile caches, and
    the clean reference record of the hostile runs' own cell (resolution 32)."""
    base = tmp_path_factory.mktemp("hostile_base")
    out = cli("-m", *TINY, "isolate=false", "resolution=48,32", f"weights_dir={tiny_weights}",
              f"results_dir={base / 'results'}", f"data_root={base / 'data'}", f"hydra.sweep.dir={base / 'sweep'}")
    assert out.returncode == 0, out.stdout + out.stderr
    recs = {r["resolution"]: r for r in load_records(str(base / "results"))}
    ref = recs[32]
    for p in (base / "results" / "runs").glob(f"{ref['key']}*"):
        p.unlink()  # the hostile runs compute this cell themselves
    return {"data": base / "data", "results": base / "results", "weights": tiny_weights, "reference": ref,
            "kept": record_files(base / "results")[f"{recs[48]['key']}.json"].name}


def _build_case(case: str, base: dict, tmp: Path) -> tuple[list[str], str]:
    """Write the hostile file for `case` under `tmp`; return (extra CLI overrides, text the message must name)."""
    weights, data = tmp / "weights", tmp / "data"
    shutil.copytree(base["weights"], weights)
    shutil.copytree(base["data"], data)
    ckpt = weights / "san_tiny.pth"
    images, labels = sorted((data / SYNTH_IMAGES).iterdir()), sorted((data / SYNTH_LABELS).iterdir())
    image, label = images[1], labels[1]
    size = Image.open(image).size
    if case == "truncated checkpoint":
        _truncate(ckpt, ckpt)
        return [], str(ckpt)
    if case == "zip that is not a checkpoint":
        ckpt.unlink()
        with zipfile.ZipFile(ckpt, "w") as z:
            z.writestr("archive/readme.txt", "a zip, not a torch checkpoint")
        return [], str(ckpt)
    if case.startswith("random bytes"):
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
        return [], str(ckpt)
    if case.startswith("pickle that runs code"):
        sd = torch.load(ckpt, weights_only=True)["model"]
        torch.save({"model": sd, "payload": Evil(str(tmp / "PWNED"))}, ckpt)
        return [], str(ckpt)
    if case.startswith("another model's checkpoint"):
        keys = [ln.split("\t")[0] for ln in (ROOT / "tests" / "fixtures" / "simseg_state_dict_keys.tsv").read_text()
                .splitlines() if ln and not ln.startswith("#")]
        torch.save({"model": {k: torch.zeros(1) for k in keys}}, ckpt)
        return [], str(ckpt)
    if case == "NaN weights":
        sd = torch.load(ckpt, weights_only=True)["model"]
        sd = {k: torch.full_like(v, float("nan")) if k.startswith("side_adapter_network") and v.is_floating_point()
              else v for k, v in sd.items()}
        torch.save({"model": sd}, ckpt)
        return [], str(images[0])  # the message names the first image whose scores are non-finite
    if case == "0-byte image":
        image.write_bytes(b"")
        return [], str(image)
    if case == "CMYK JPEG image":
        Image.open(image).convert("CMYK").save(image)
        assert Image.open(image).mode == "CMYK"
        return [], ""
    if case == "greyscale JPEG image":
        Image.open(image).convert("L").save(image)
        assert Image.open(image).mode == "L"
        return [], ""
    if case == "16-bit greyscale image":  # PNG content under the .jpg name the layout expects (PIL reads by content)
        grey = np.asarray(Image.open(image).convert("L")).astype(np.uint16) * 257
        Image.fromarray(grey).save(image, format="PNG")
        assert Image.open(image).mode.startswith("I")
        return [], ""
    if case == "label of another size than its image":
        Image.fromarray(np.zeros((size[1] + 3, size[0]), np.uint8)).save(label)
        return [], str(label)
    if case == "palette (mode P) label PNG":
        idx = np.asarray(Image.open(label))
        pal = Image.fromarray(idx, mode="L").convert("P")
        pal.putpalette([(i * 37) % 256 for i in range(768)])  # colours unrelated to the indices
        pal.putdata(idx.ravel().tolist())
        pal.save(label)
        assert Image.open(label).mode == "P" and (np.asarray(Image.open(label)) == idx).all()
        return [], ""
    names = (ROOT / "bench" / "data" / "classnames" / "synthetic8.txt").read_text().splitlines()
    names = [n for n in names if n.strip() and not n.startswith("#")]
    if case == "class-name file with blank lines":
        f = tmp / "blank.txt"
        f.write_text("\n" + "\n\n   \n".join(names) + "\n\n")
        return [f"dataset.classes_file={f}", f"profile.vocabulary={f}"], ""
    if case == "class-name file with a duplicate line":
        f = tmp / "dup.txt"
        f.write_text("\n".join(names[:-1] + [names[0]]) + "\n")  # still 8 lines: the count check cannot catch it
        return [f"dataset.classes_file={f}"], str(f)
    if case.startswith("results_dir on a path"):
        return ["isolate=true", "results_dir=/proc/ovseg-bench-no-such-dir/results"], "/proc/ovseg-bench-no-such-dir"
    if case.startswith("config key typo"):
        return ["presicion=fp32"], "presicion"
    if case.startswith("unknown model"):
        return ["model=san_x"], "san_x"
    raise AssertionError(case)


@pytest.mark.parametrize("case,behaviour,fragment", [
    pytest.param(*c, id=_slug(c[0]), marks=[pytest.mark.xfail(strict=True, reason=XFAIL[c[0]])] if c[0] in XFAIL
                 else []) for c in HOSTILE_CASES])
def test_hostile_input(case, behaviour, fragment, hostile_base, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(hostile_base["results"], results)
    kept = results / "runs" / hostile_base["kept"]
    before = (kept.stat().st_mtime_ns, kept.read_bytes())
    extra, names = _build_case(case, hostile_base, tmp_path)
    out = cli(*TINY, "isolate=false", "resolution=32", f"weights_dir={tmp_path / 'weights'}",
              f"results_dir={results}", f"data_root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}", *extra)
    text = out.stdout + out.stderr
    shown = [ln for ln in text.splitlines() if (fragment or "[ok]") in ln] or text.strip().splitlines()[:1]
    print(f"\n{case} | exit {out.returncode} | {shown[0] if shown else ''}")  # `pytest -s`: the README table rows
    assert "Traceback" not in text, text
    recs = [r for r in load_records(str(results)) if r["resolution"] == 32]
    if behaviour.startswith("refused"):
        assert out.returncode == 1 and not recs
        first = next(ln for ln in out.stderr.splitlines() if ln.strip())
        assert fragment in first and names in first, out.stderr
    elif behaviour.startswith("error"):
        assert out.returncode != 0, text
        lines = [ln for ln in text.splitlines() if fragment in ln]
        assert len(lines) == 1 and names in lines[0], text  # one clear line, naming the file
        if "no unsafe opt-in" in behaviour:
            assert "allow_unsafe_pickle" not in text, text
        if not case.startswith("results_dir"):
            assert len(recs) == 1 and recs[0]["status"] == "error" and "mIoU" not in recs[0]
            assert fragment in recs[0]["reason"] and names in recs[0]["reason"] and "\n" not in recs[0]["reason"]
    else:
        assert out.returncode == 0, text
        assert len(recs) == 1 and recs[0]["status"] == "ok" and recs[0]["images_evaluated"] == 4, text
        if behaviour.startswith(("read as indices", "blank lines skipped")):
            ref = hostile_base["reference"]
            assert recs[0]["per_class"] == ref["per_class"] and recs[0]["mIoU"] == ref["mIoU"]
    assert not (tmp_path / "PWNED").exists()  # the pickle's payload never ran
    assert (kept.stat().st_mtime_ns, kept.read_bytes()) == before  # nothing already computed is lost
    assert len(load_records(str(results))) == 1 + len(recs)


def test_unsafe_pickle_runs_only_with_the_explicit_opt_in(tmp_path):
    """The marker check above is meaningful: the same payload does run once a user opts in (in-process loader)."""
    from bench.models.checkpoint import read_state_dict

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil(str(tmp_path / "PWNED"))}, path)
    from bench import BenchError

    with pytest.raises(BenchError, match="allow_unsafe_pickle=true"):
        read_state_dict(str(path))
    assert not (tmp_path / "PWNED").exists()
    read_state_dict(str(path), allow_unsafe_pickle=True)
    assert (tmp_path / "PWNED").exists()
