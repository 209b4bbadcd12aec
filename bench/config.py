"""The typed configuration of a cell (Hydra structured configs), and which part of it determines a result.

`BenchConfig` is the schema of `conf/config.yaml`: Hydra validates every value against it when the config is
composed, so `precision=fp8`, `compile=yes` or `resolution=abc` fail before anything runs, with the valid values.
It is two dataclasses in one:
- `CellSettings`: everything that determines a cell's result (model, dataset, resolution, precision, profile, ...).
  The record key is the hash of exactly this part (`result_part`), so no hand-kept list of keys to ignore exists;
  inside the model and dataset configs, fields marked `RUN` (display names, published figures, download URLs,
  board order) do not count either.
- `RunSettings`: where files are and how the run behaves (paths, force, isolate, progress, workers).
Model and dataset configs (`conf/model/*.yaml`, `conf/dataset/*.yaml`, or a user's own folder on Hydra's search
path) are validated against `ModelConfig` / `DatasetConfig`: an unknown top-level key is an error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bench.precision import PRECISION_NAMES

PrecisionName = Enum("PrecisionName", {name: name for name in PRECISION_NAMES})
CompileMode = Enum("CompileMode", {m: m for m in ("eager", "default", "reduce-overhead", "max-autotune")})
MiouFormula = Enum("MiouFormula", {"current": "current", "v06": "v06"})

RUN = {"result": False}   # field metadata: this field never changes a result (left out of the record key)
IF_SET = {"result": "if_set"}   # field metadata: in the record key only away from its default (a field added later
                                # keeps the keys of every record written before it: same result, same key)


def if_set_field(default: Any = None):
    return field(default=default, metadata=IF_SET)


def run_field(default: Any = None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata=RUN)
    return field(default=default, metadata=RUN)


# ---------------------------------------------------------------------------------------------------- model, data
@dataclass
class CheckpointConfig:
    file: str = MISSING                      # published file name, looked up in weights_dir
    ignore_prefixes: List[str] = field(default_factory=list)   # published keys the released code never uses
    optional_keys: List[str] = field(default_factory=list)     # keys a checkpoint may lack (noted in the record)
    urls: List[str] = run_field(factory=list)
    hf_repo: Optional[str] = run_field()
    hf_repo_type: Optional[str] = run_field()
    gdrive_id: Optional[str] = run_field()
    size: Optional[int] = run_field()
    sha256: Optional[str] = run_field()


@dataclass
class ModelConfig:
    name: str = MISSING
    builder: str = MISSING                   # registered builder name, or a dotted path `pkg.module:function`
    builder_kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    protocol: Dict[str, Any] = field(default_factory=dict)      # short_side, max_size
    params: Dict[str, Any] = field(default_factory=dict)        # trainable / text prefixes, published trainable
    dataset_settings: Dict[str, Any] = field(default_factory=dict)
    settings_from_config: Dict[str, str] = field(default_factory=dict)
    settings_not_published: List[str] = field(default_factory=list)
    class_name_overrides: Dict[str, Any] = field(default_factory=dict)
    display: Optional[str] = run_field()
    order: int = run_field(1000)            # position on the leaderboard
    published: Dict[str, Any] = run_field(factory=dict)
    golden_fill: Optional[str] = run_field()  # bench.testing.fills family used by profile.weights=golden
    official: Dict[str, Any] = run_field(factory=dict)  # how bench.official runs the official code (script, config)


@dataclass
class DatasetConfig:
    name: str = MISSING
    classes_file: str = MISSING
    num_classes: int = MISSING
    ignore_label: int = 255
    layout: Dict[str, Any] = field(default_factory=dict)
    alt_layouts: List[Any] = field(default_factory=list)
    label_order: Optional[str] = None
    label_orders: Dict[str, Any] = field(default_factory=dict)
    sg_iou_table: Optional[Dict[str, Any]] = None
    void_reweight: bool = False
    generate: bool = False
    synth: Dict[str, Any] = field(default_factory=dict)
    vocabulary_file: Optional[str] = if_set_field()   # names the model is asked for, if not classes_file (proxies)
    proxy_label: Optional[int] = if_set_field()       # predicted vocabulary ids >= this are scored as this label id
    variant_of: Optional[str] = if_set_field()        # a scoring variant of this dataset: its model settings apply
    display_name: Optional[str] = run_field()
    protocol: Optional[str] = run_field()    # how the dataset is scored, in words (shown on the leaderboard)
    registered_name: Optional[str] = run_field()
    official_val_images: Optional[int] = run_field()
    order: int = run_field(1000)


# ---------------------------------------------------------------------------------------------------- profile
@dataclass
class ProfileConfig:
    enabled: bool = True
    vocabulary: str = "ade150.txt"           # vocabulary (size K) the efficiency figures are measured with
    warmup: Optional[int] = None             # null = 20 on GPU (50 with compile), 1 on CPU (2 with compile)
    iters: Optional[int] = None              # null = 100 on GPU, 3 on CPU
    throughput_batch: Optional[int] = None   # also measure images/s at this batch (model scope)
    crop_batch: int = 8                      # crop models: per-crop cost from one batch of this many crops
    crop_count: Optional[int] = None         # crops the speed figures assume (null = the evaluated mean, else 100)
    image: Optional[str] = None              # benchmark image (.npy HWC uint8); null = seeded noise
    weights: str = "init"                    # weights while profiling: init (seeded builder init) | golden (fill)
    interleave_peak: bool = False            # a peak-probe matmul before every timed iteration (shared machines)
    peak_size: int = 2048                    # matmul peak probe: n x n operands
    agreement: bool = False                  # reduced precision: label agreement with fp32 on the benchmark image
    agreement_margin: float = 1.0e-3         # ... on pixels whose fp32 top-2 margin >= this x the max |score|
    agreement_fill: str = if_set_field("weights")   # weights of the agreement check: as timed | label_check
    gap_table: bool = False                  # op-category time table (torch.profiler) beside the record
    allocator: str = "default"               # default | heap (glibc keeps freed memory: no page faults)
    channels_last: bool = False              # NHWC convolution weights
    compile_freezing: bool = True            # inductor freezing with compile (weights as constants)
    targets: Dict[str, Any] = run_field(factory=dict)   # {model: {fp32_model: 1.15, bf16_agreement: 0.99, ...}}
    background_load: int = if_set_field(0)   # CPU-bound processes kept running while timing (a busy machine)
    official: bool = if_set_field(False)     # time the official code beside ours (bench.official), interleaved
    official_env: Optional[str] = run_field()   # its reference environment (null: $OVSEG_REFERENCE_ENV)


# ---------------------------------------------------------------------------------------------------- the cell
@dataclass
class CellSettings:
    """What determines a cell's result: the record key hashes exactly these fields."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    resolution: Optional[int] = None         # null = the model's own protocol; a number sets the short side
    precision: PrecisionName = PrecisionName["fp32"]
    compile: CompileMode = CompileMode["eager"]
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None            # CPU threads (null = torch default)
    batch_size: int = 1
    max_images: Optional[int] = None         # evaluate only the first N images
    evaluate: bool = True                    # false: efficiency figures only (a speed cell)
    synthesize_weights: bool = False         # pipeline check with seeded random weights (never a result)
    compare_fp32_images: int = 8             # reduced-precision cells: compare the first N images with fp32
    miou_formula: MiouFormula = MiouFormula["current"]
    seed: int = 0
    shift_seed: int = 0
    repeat: int = 0                          # repeat index: the same cell again as its own record
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class RunSettings:
    """Where files are and how the run behaves: never part of a result."""

    weights_dir: str = "weights"
    data_root: str = "datasets"
    results_dir: str = "results"
    force: bool = False                      # recompute a cell whose ok record exists
    isolate: bool = True                     # each cell in a fresh process
    progress: bool = True
    num_workers: int = 0                     # DataLoader workers (decode + resize)
    text_cache: bool = True                  # class text features cached on disk
    allow_unsafe_pickle: bool = False        # opt in to torch.load(weights_only=False)


@dataclass
class BenchConfig(RunSettings, CellSettings):
    pass


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunSettings))


def register() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml lists `bench_schema` first in its defaults)."""
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


register()


# ---------------------------------------------------------------------------------------------------- result part
def _result_fields(schema, data: Any) -> Any:
    """`data` without the fields `schema` marks RUN, recursively through nested dataclasses."""
    if not (dataclasses.is_dataclass(schema) and isinstance(data, dict)):
        return data
    out = {}
    kinds = {f.name: f for f in dataclasses.fields(schema)}
    for name, value in data.items():
        f = kinds.get(name)
        if f is not None and f.metadata.get("result") is False:
            continue
        if f is not None and f.metadata.get("result") == "if_set" and value == f.default:
            continue
        sub = f.type if f is not None else None
        sub = _SCHEMAS.get(sub, sub) if isinstance(sub, str) else sub
        out[name] = _result_fields(sub, value)
    return out


_SCHEMAS = {"CheckpointConfig": CheckpointConfig, "ModelConfig": ModelConfig, "DatasetConfig": DatasetConfig,
            "ProfileConfig": ProfileConfig}


# Settings that only reduced-precision cells read (the fp32 label-agreement check): out of an fp32 / tf32 cell's key,
# so that setting them in a sweep of several precisions does not orphan that sweep's finished fp32 records.
REDUCED_ONLY = ("agreement_fill",)


def result_part(config: dict) -> dict:
    """The part of a resolved config (plain dict) that determines the result: what the record key hashes."""
    out = _result_fields(CellSettings, {k: v for k, v in config.items() if k not in RUN_KEYS and k != "hydra"})
    profile = out.get("profile")
    if isinstance(profile, dict) and not _reduced(out.get("precision")):
        out["profile"] = {k: v for k, v in profile.items() if k not in REDUCED_ONLY}
    return out


def _reduced(precision) -> bool:
    from bench import BenchError
    from bench import precision as precision_mod

    try:
        return precision_mod.is_reduced(str(precision))
    except BenchError:   # an unknown name is refused when the config is checked; keep every field in its key
        return True


def plain(cfg: DictConfig) -> DictConfig:
    """The composed (typed) config as a plain, resolved DictConfig with enum values as strings, without `hydra`."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    c.pop("hydra", None)
    return OmegaConf.create(c)


def upgrade(config: dict) -> dict:
    """A config stored by an older version, brought to today's schema (new fields at their defaults):
    `compile: false` became `compile: eager`."""
    c = dict(config)
    if c.get("compile") in (False, None, "false"):
        c["compile"] = "eager"
    c.pop("task", None)
    base = OmegaConf.structured(BenchConfig)
    for part in ("model", "dataset"):
        base[part] = OmegaConf.structured(ModelConfig if part == "model" else DatasetConfig)
    merged = OmegaConf.merge(base, {k: v for k, v in c.items() if k in _known_keys()})
    out = OmegaConf.to_container(merged, resolve=False, enum_to_str=True)
    return {k: v for k, v in out.items() if k not in RUN_KEYS}


def _known_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(BenchConfig)}


# ---------------------------------------------------------------------------------------------------- values
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
CHOICES = {"profile.weights": ("init", "golden"), "profile.allocator": ("default", "heap"),
           "profile.agreement_fill": ("weights", "label_check")}
MINIMUM = {"resolution": 32, "batch_size": 1, "max_images": 1, "threads": 1, "compare_fp32_images": 0, "repeat": 0,
           "profile.crop_batch": 1, "profile.iters": 1, "profile.warmup": 0, "profile.crop_count": 0,
           "profile.throughput_batch": 1, "profile.peak_size": 16,
           "profile.background_load": 0}


def check_values(cfg: DictConfig) -> None:
    """What the types cannot say, checked right after composing: one BenchError line naming the value and the
    valid ones (the entry point exits 2 and writes no record)."""
    import re

    from bench import BenchError

    if not re.fullmatch(DEVICE_PATTERN, str(cfg.device)):
        raise BenchError(f"device={cfg.device}: use auto, cpu, cuda or cuda:N")
    for path, choices in CHOICES.items():
        value = OmegaConf.select(cfg, path)
        if value not in choices:
            raise BenchError(f"{path}={value}: use one of {', '.join(choices)}")
    for path, low in MINIMUM.items():
        value = OmegaConf.select(cfg, path)
        if value is not None and value < low:
            raise BenchError(f"{path}={value}: must be at least {low}" + (" (or null)" if path != "batch_size" else ""))


def check_overrides(argv: list[str]) -> None:
    """Validate the command line's `key=value` overrides (each value of a `-m` sweep too) against the schema
    before Hydra composes anything, so a bad value is one line (Hydra's own report spans several) and exit 2."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import OmegaConfBaseException

    from bench import BenchError

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:   # noqa: BLE001 - a syntax error: Hydra reports it itself
        return
    base = OmegaConf.structured(BenchConfig)
    fields = {f.name for f in dataclasses.fields(BenchConfig)} - {"model", "dataset"}
    for ov in overrides:
        key = ov.key_or_group.lstrip("+~")
        if key.split(".")[0] not in fields or ov.is_delete():
            continue
        values = list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]
        for value in values:
            try:
                OmegaConf.update(base, key, value, merge=True)
            except OmegaConfBaseException as e:
                reason = str(e).splitlines()[0]
                raise BenchError(f"{key}={value}: {reason}") from None
