"""What the board knows beyond the measurements: each model's display name, protocol resolution, published mIoU
sources and table order, each dataset's order, and the GPU datasheet peaks.

Models and datasets: from the records. A record carries its model config's `published` mapping verbatim and the
`order` of its model and dataset configs (`model_order`, `dataset_order`); the newest record of a model that has a
field wins, so a model benchmarked from a YAML outside conf/ gets its published figures and place on the board.
Records written before those fields existed fall back to `conf/model/*.yaml` and `conf/dataset/*.yaml`.
Peaks: `gpu_peaks.yaml` beside this module (datasheet figures, with their sources), used only when a record has no
measured `peak_gflops`.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from bench import precision as precisions
from bench.board.fmt import as_str, num

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")
GPU_PEAKS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_peaks.yaml")
PRECISION_ORDER = list(precisions.PRECISION_NAMES)


@dataclass
class Source:
    tag: str                      # P (paper table) | L (official log)
    kind: str                     # paper table | official log
    text: str
    miou: dict[str, float]
    formula: str | None           # the mIoU formula the source used, where it is known


@dataclass
class ModelInfo:
    name: str
    display: str
    protocol: int | None
    sources: list[Source] = field(default_factory=list)
    order: int | None = None


@dataclass
class Catalog:
    """The models and datasets of a results folder, with their facts and table order."""
    models: dict[str, ModelInfo]
    model_order: list[str]        # every known model, by `order` then name
    dataset_order: list[str]


def sources_from(pub: dict | None) -> list[Source]:
    """A model config's `published` mapping -> its paper-table and official-log sources."""
    pub = pub or {}
    sources = []
    if pub.get("miou"):
        sources.append(Source("P", "paper table", pub.get("source", ""), dict(pub["miou"]), pub.get("formula")))
    if pub.get("log_miou"):
        text = pub.get("log_source", "")
        formula = pub.get("log_formula") or ("current" if "current" in text else None)
        sources.append(Source("L", "official log", text, dict(pub["log_miou"]), formula))
    return sources


def _yaml_files(conf_dir: str | None, group: str) -> list[dict]:
    folder = os.path.join(conf_dir or CONF_DIR, group)
    if not os.path.isdir(folder):
        return []
    return [OmegaConf.to_container(OmegaConf.load(os.path.join(folder, n)), resolve=False)
            for n in sorted(os.listdir(folder)) if n.endswith(".yaml")]


def published_figures(conf_dir: str | None = None) -> dict[str, ModelInfo]:
    """model name -> display name, protocol short side, published sources and order, from conf/model/*.yaml."""
    out = {}
    for cfg in _yaml_files(conf_dir, "model"):
        protocol = (cfg.get("protocol") or {}).get("short_side")
        out[cfg["name"]] = ModelInfo(cfg["name"], cfg.get("display", cfg["name"]), protocol,
                                     sources_from(cfg.get("published")), _int(cfg.get("order")))
    return out


def dataset_orders(conf_dir: str | None = None) -> dict[str, int]:
    return {cfg["name"]: o for cfg in _yaml_files(conf_dir, "dataset") if (o := _int(cfg.get("order"))) is not None}


def _int(v) -> int | None:
    f = num(v)
    return None if f is None else int(f)


def _first(values):
    return next((v for v in values if v is not None and v != ""), None)


def _config_protocol(rec: dict) -> int | None:
    model = (rec.get("config") or {}).get("model") if isinstance(rec.get("config"), dict) else None
    return _int(((model or {}).get("protocol") or {}).get("short_side")) if isinstance(model, dict) else None


def _by_order(orders: dict[str, int | None]) -> list[str]:
    return sorted(orders, key=lambda n: (orders[n] is None, orders[n] or 0, n))


def catalog(recs: list[dict], conf_dir: str | None = None) -> Catalog:
    """The models and datasets of `recs`, each fact from the newest record that has it, else from the configs."""
    newest = sorted(recs, key=lambda r: as_str(r.get("timestamp")), reverse=True)
    conf = functools.lru_cache(maxsize=None)(lambda: published_figures(conf_dir))
    models: dict[str, ModelInfo] = {}
    for name in dict.fromkeys(as_str(r.get("model")) for r in newest if as_str(r.get("model"))):
        rs = [r for r in newest if r.get("model") == name]
        pub = _first(r.get("published") for r in rs if isinstance(r.get("published"), dict))
        display = _first(as_str(r.get("model_display")) for r in rs)
        protocol = (_first(_config_protocol(r) for r in rs)
                    or _first(_int(r.get("resolution")) for r in rs if r.get("resolution_is_protocol") is True))
        order = _first(_int(r.get("model_order")) for r in rs)
        if pub is None or display is None or protocol is None or order is None:
            known = conf().get(name) or ModelInfo(name, name, None)
            display, protocol = display or known.display, protocol or known.protocol
            order = order if order is not None else known.order
        sources = sources_from(pub) if pub is not None else known.sources
        models[name] = ModelInfo(name, display, protocol, sources, order)
    ds_conf = functools.lru_cache(maxsize=None)(lambda: dataset_orders(conf_dir))
    ds: dict[str, int | None] = {}
    for name in dict.fromkeys(as_str(r.get("dataset")) for r in newest if as_str(r.get("dataset"))):
        order = _first(_int(r.get("dataset_order")) for r in newest if r.get("dataset") == name)
        ds[name] = order if order is not None else ds_conf().get(name)
    return Catalog(models, _by_order({m: i.order for m, i in models.items()}), _by_order(ds))


# ---------------------------------------------------------------------------------------------------- peaks
@functools.lru_cache(maxsize=None)
def gpu_peaks(path: str = GPU_PEAKS_FILE) -> list[dict]:
    """The datasheet entries of gpu_peaks.yaml, in file order (first match wins)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)["devices"]


def peak_kind(precision_name: str) -> str | None:
    """The matmul peak a precision is judged against (bench.precision), None for a name it does not define."""
    return precisions.PRECISIONS[precision_name].peak if precision_name in precisions.PRECISIONS else None


def peak_gflops(row) -> tuple[float | None, str]:
    """Peak GFLOP/s for the row's device and precision: the record's measured `peak_gflops`, else a datasheet."""
    measured = num(row.get("peak_gflops"))
    if measured:
        return measured, "measured matmul peak, from the record"
    name = as_str(row.get("device_name"))
    key = as_str(row.get("peak_kind")) or peak_kind(as_str(row.get("precision")))
    if as_str(row.get("device_type")) == "cuda" or "NVIDIA" in name or "GeForce" in name:
        for entry in gpu_peaks():
            if re.search(entry["match"], name, flags=re.IGNORECASE):
                if key in entry["peaks"]:
                    return entry["peaks"][key] * 1e3, f"{entry['label']} datasheet, dense {key}"
                return None, ""
    return None, ""
