"""Record-key migration: a record written under the previous key layout is found again after
`python -m bench.migrate` (clarifications §22), and the cell is then skipped instead of recomputed."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import bench.config  # noqa: F401  (registers the schema)
from bench.cell import run_cell
from bench.records import load_records, record_path

ROOT = Path(__file__).resolve().parents[1]
NEW_FIELDS = ("evaluate",)
NEW_PROFILE_FIELDS = ("crop_count", "image", "weights", "interleave_peak", "peak_size", "agreement",
                      "agreement_margin", "gap_table", "allocator", "channels_last", "compile_freezing", "targets")


def old_style(config: dict) -> tuple[str, dict]:
    """The record config and key as the code before the typed schema wrote them: no new fields, `compile: false`,
    no `order`, and the key = sha256 of the JSON of that config."""
    old = json.loads(json.dumps(config))
    for name in NEW_FIELDS + ("task", "cpu_speed"):
        old.pop(name, None)
    for name in NEW_PROFILE_FIELDS:
        old["profile"].pop(name, None)
    old["compile"] = False
    for part in ("model", "dataset"):
        old[part].pop("order", None)
    blob = json.dumps(old, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16], old


def test_migrate_moves_old_records_to_the_current_key(tmp_path):
    results = tmp_path / "results"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"results_dir={results}", f"data_root={tmp_path / 'data'}",
                                           "dataset=synthetic", "synthesize_weights=true", "profile.enabled=false",
                                           "resolution=64", "progress=false", "isolate=false"])
    rec = run_cell(cfg)
    assert rec["status"] == "ok", rec.get("reason")
    new_path = Path(record_path(str(results), rec["key"]))
    old_key, old_config = old_style(rec["config"])
    assert old_key != rec["key"]
    old_rec = dict(rec, key=old_key, config=old_config)
    Path(record_path(str(results), old_key)).write_text(json.dumps(old_rec))
    new_path.unlink()

    out = subprocess.run([sys.executable, "-m", "bench.migrate", f"results_dir={results}"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "1 moved" in out
    recs = load_records(str(results))
    assert [r["key"] for r in recs] == [rec["key"]] and recs[0]["migrated_from"] == old_key
    assert recs[0]["mIoU"] == rec["mIoU"]
    mtime = new_path.stat().st_mtime_ns
    again = run_cell(cfg)
    assert again["key"] == rec["key"] and new_path.stat().st_mtime_ns == mtime   # skipped: not recomputed
    out = subprocess.run([sys.executable, "-m", "bench.migrate", f"results_dir={results}"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "0 moved" in out and "1 already current" in out
