"""Records: stable keys, atomic writes, skip-if-done, concurrent writers, unreadable records ignored."""
import json
import multiprocessing as mp
import os

import pytest

from bench import BenchError
from bench.records import (atomic_write_json, cell_key, is_done, key_inputs, load_records, read_record, record_path)

CFG = {"model": {"name": "san_b"}, "dataset": {"name": "ade150"}, "resolution": None, "precision": "fp32",
       "results_dir": "results", "force": False, "progress": True, "weights_dir": "w", "data_root": "d"}


def test_key_is_stable_and_ignores_non_result_keys():
    k = cell_key(CFG)
    assert k == cell_key(dict(reversed(list(CFG.items()))))
    assert k == cell_key({**CFG, "results_dir": "elsewhere", "force": True, "progress": False, "data_root": "x"})
    assert k != cell_key({**CFG, "precision": "bf16"})
    assert "results_dir" not in key_inputs(CFG) and "precision" in key_inputs(CFG)


def test_atomic_write_and_skip(tmp_path):
    path = record_path(str(tmp_path), "abc")
    atomic_write_json(path, {"key": "abc", "status": "error"})
    assert not is_done(str(tmp_path), "abc")
    atomic_write_json(path, {"key": "abc", "status": "ok", "mIoU": float("nan")})
    assert is_done(str(tmp_path), "abc")
    assert [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp")] == []


def test_damaged_record_is_ignored_not_fatal(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "bad.json").write_text('{"key": "bad", "sta')
    atomic_write_json(str(folder / "good.json"), {"key": "good", "status": "ok"})
    assert read_record(str(folder / "bad.json")) is None
    assert [r["key"] for r in load_records(str(tmp_path))] == ["good"]


def test_unwritable_results_dir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = str(blocker / "runs" / "k.json")
    else:
        target = str(ro / "runs" / "k.json")
    with pytest.raises(BenchError, match="results_dir"):
        atomic_write_json(target, {"key": "k"})


def _writer(args):
    results_dir, worker = args
    for i in range(25):
        key = f"w{worker}-{i}"
        atomic_write_json(record_path(results_dir, key), {"key": key, "status": "ok", "payload": "x" * 5000})
        atomic_write_json(record_path(results_dir, "shared"), {"key": "shared", "status": "ok", "by": worker,
                                                               "payload": "y" * 20000})


def test_eight_concurrent_writers_lose_and_corrupt_nothing(tmp_path):
    with mp.get_context("spawn").Pool(8) as pool:
        pool.map(_writer, [(str(tmp_path), w) for w in range(8)])
    recs = load_records(str(tmp_path))
    assert len(recs) == 8 * 25 + 1
    names = os.listdir(tmp_path / "runs")
    assert all(not n.startswith(".tmp") for n in names)
    for n in names:
        json.loads((tmp_path / "runs" / n).read_text())  # every file parses


def test_key_is_the_same_after_a_json_round_trip_of_int_keyed_mappings():
    """An isolated cell's child reads its config back from JSON, where YAML's int keys ({7: 'bed ', 11: ...},
    CAT-Seg's class-name overrides) became strings: parent and child must compute one key, and keys of configs
    with at most one such key per mapping (every record written before) stay as they were."""
    cfg = {**CFG, "model": {**CFG.get("model", {}), "class_name_overrides": {"ade150": {7: "bed ", 11: "sidewalk"}}}}
    assert cell_key(cfg) == cell_key(json.loads(json.dumps(cfg)))
    one = {**CFG, "model": {**CFG.get("model", {}), "class_name_overrides": {"voc20": {19: "tvmonitor"}}}}
    import hashlib
    old = hashlib.sha256(json.dumps(key_inputs(one), sort_keys=True, default=str,
                                    separators=(",", ":")).encode()).hexdigest()[:16]
    assert cell_key(one) == old


def test_reduced_precision_settings_stay_out_of_fp32_keys():
    """profile.agreement_fill is read by reduced-precision cells only: a sweep that sets it for fp32 and bf16 cells
    alike keeps the fp32 cells' keys (their finished records are found, not recomputed); a bf16 cell's key moves."""
    fp32, bf16 = {**CFG, "precision": "fp32"}, {**CFG, "precision": "bf16"}
    for base in (fp32, bf16):
        base["profile"] = {**base.get("profile", {}), "agreement": True}
    label = lambda c: {**c, "profile": {**c["profile"], "agreement_fill": "label_check"}}   # noqa: E731
    assert cell_key(label(fp32)) == cell_key(fp32)
    assert cell_key(label(bf16)) != cell_key(bf16)
    assert "agreement_fill" in key_inputs(label(bf16))["profile"]
