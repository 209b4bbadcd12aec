"""`python -m bench.migrate [results_dir=results]`: rewrite records written under an older record key.

A record's key hashes the result-determining part of its config (bench.config). When that part gains a field
(say a new profile knob, at a default that reproduces the old behaviour) every key changes, and without this
command every finished cell would be recomputed: a lost result for a user with GPU-weeks in `results/`
(clarifications §22). The command reads each record's stored `config`, brings it to today's schema
(`bench.config.upgrade`: new fields at their defaults), and, where the key differs, writes the record under the
new key (and its `.timings.json` beside it) before removing the old file. It is idempotent; a record that would
overwrite a different existing record under the new key is left alone and reported.
"""
from __future__ import annotations

import os
import sys

from bench import BenchError, records
from bench.config import upgrade


def migrate(results_dir: str) -> dict[str, int]:
    """Move every record whose key is out of date to its current key; returns counts."""
    counts = {"records": 0, "migrated": 0, "current": 0, "conflicts": 0}
    for rec in records.load_records(results_dir):
        counts["records"] += 1
        config = upgrade(rec.get("config") or {})
        key = records.cell_key(config)
        if key == rec["key"]:
            counts["current"] += 1
            continue
        new_path = records.record_path(results_dir, key)
        existing = records.read_record(new_path)
        if existing is not None and existing.get("status") == "ok" and rec.get("status") != "ok":
            counts["conflicts"] += 1   # a newer ok result already sits under the new key
            continue
        old_path = records.record_path(results_dir, rec["key"])
        records.atomic_write_json(new_path, dict(rec, key=key, config=records.key_inputs(config),
                                                 migrated_from=rec["key"]))
        old_timings = old_path[:-len(".json")] + ".timings.json"
        if os.path.isfile(old_timings):
            os.replace(old_timings, new_path[:-len(".json")] + ".timings.json")
        os.unlink(old_path)
        counts["migrated"] += 1
    return counts


def main(argv: list[str]) -> int:
    results_dir = "results"
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "results_dir" or not value:
            raise BenchError(f"unknown argument {arg!r}; usage: python -m bench.migrate [results_dir=DIR]")
        results_dir = value
    counts = migrate(results_dir)
    print(f"migrate: {counts['records']} records in {results_dir}/runs: {counts['migrated']} moved to their current "
          f"key, {counts['current']} already current, {counts['conflicts']} left (a result exists under the new key)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
