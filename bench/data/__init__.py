"""Datasets: where each lives on disk (`layouts`), reading and checking it (`dataset`), tiny copies (`synth`).

The per-dataset facts are data: `conf/dataset/*.yaml` (layout, ignore value, classes file, official count),
`bench/data/classnames/*.txt` (vocabularies in id order) and `bench/data/sg_iou/*.json` (SCAN's SG-IoU tables).
"""
from bench.data.dataset import (CheckReport, SemSegDataset, build_dataset, check_dataset, read_image, read_label)
from bench.data.layouts import (DatasetSpec, Layout, apply_class_name_overrides, find_layout, load_class_names,
                                pair_files, proxy_predictions, resolve_data_root, spec_from_cfg,
                                vocabulary_names)

__all__ = [
    "CheckReport", "DatasetSpec", "Layout", "SemSegDataset", "apply_class_name_overrides", "build_dataset",
    "check_dataset", "find_layout", "load_class_names", "pair_files", "read_image",
    "proxy_predictions", "read_label", "resolve_data_root", "spec_from_cfg", "vocabulary_names",
]
