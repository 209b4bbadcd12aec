"""The model registry: registered names, dotted builder paths and installed packages' entry points, and the one-line
error of each way a builder can fail. The user packages are real modules written to a temporary folder on
sys.path; the entry points come from a real `*.dist-info` there (what `pip install` leaves), read by
importlib.metadata."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import BenchError
from bench.models import create_model, list_models, registry
from bench.models.base import OVSegModel

MODULE = """
import torch
from bench.models.base import OVSegModel, Protocol


class Mine(OVSegModel):
    def __init__(self, width=8):
        super().__init__(Protocol(short_side=96))
        self.width = width


def build(width=8):
    return Mine(width)


class Factory:
    @staticmethod
    def make():
        return Mine(3)


def not_a_model():
    return torch.nn.Linear(2, 2)


build_count = 3
"""


@pytest.fixture
def user_pkg(tmp_path, monkeypatch) -> str:
    """An importable package: `<name>.models` (builders), `<name>.broken` and `<name>.raises` (fail on import)."""
    name = f"userpkg_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODULE)
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    (pkg / "raises.py").write_text("raise RuntimeError('no GPU here\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def install_entry_points(folder: Path, lines: list[str]) -> None:
    """What `pip install` of a package declaring `[project.entry-points."ovseg_bench.models"]` leaves on sys.path."""
    info = folder / "userdist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: userdist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")


def fails(builder: str, *needles: str) -> str:
    with pytest.raises(BenchError) as err:
        create_model(builder)
    msg = str(err.value)
    assert "\n" not in msg and builder in msg, msg
    assert all(n in msg for n in needles), msg
    return msg


# ------------------------------------------------------------------------------------------------ dotted paths
def test_dotted_path_builds_the_model_with_kwargs(user_pkg):
    model = create_model(f"{user_pkg}.models:build", width=5)
    assert isinstance(model, OVSegModel) and type(model).__name__ == "Mine" and model.width == 5
    assert model.protocol.short_side == 96
    nested = create_model(f"{user_pkg}.models:Factory.make")   # the attribute may be dotted
    assert nested.width == 3


def test_dotted_path_errors_are_one_line_and_name_the_path(user_pkg):
    fails("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'", "PYTHONPATH")
    fails(f"{user_pkg}.missing:build", f"cannot import module '{user_pkg}.missing'",
          f"no module named '{user_pkg}.missing'")
    # an import error inside the user's module names what is missing
    fails(f"{user_pkg}.broken:build", f"importing module '{user_pkg}.broken' failed",
          "a_dependency_that_is_not_installed", "install what it needs")
    fails(f"{user_pkg}.raises:build", f"importing module '{user_pkg}.raises' failed (RuntimeError: no GPU here)")
    fails(f"{user_pkg}.models:buidl", f"module '{user_pkg}.models' has no attribute 'buidl'")
    fails(f"{user_pkg}.models:build_count", "'build_count'", "is not callable (type int)")
    fails(f"{user_pkg}.models:not_a_model", "returned a Linear, not an OVSegModel")
    fails(f"{user_pkg}.models:", "'package.module:function'")


def test_unknown_name_lists_the_registered_builders():
    msg = fails("san_vit_b_61", "unknown model builder", "san_vit_b_16", "scan_vit_l_14", "'package.module:function'")
    assert "san_vit_b_61" in msg


# ------------------------------------------------------------------------------------------------ entry points
def test_entry_points_are_listed_and_built_lazily(user_pkg, tmp_path, monkeypatch, caplog):
    install_entry_points(tmp_path, [f"user_model = {user_pkg}.models:build",
                                    f"san_vit_b_16 = {user_pkg}.models:build",       # shadowed by the built-in
                                    f"user_broken = {user_pkg}.models:buidl"])
    monkeypatch.setattr(registry, "_entry_points", None)
    registry.get_builder("san_vit_b_16")
    assert registry._entry_points is None          # a registered name never scans the installed packages
    with caplog.at_level("WARNING", logger="bench.models.registry"):
        names = list_models()
    assert "user_model" in names and "user_broken" in names and "san_vit_b_16" in names
    assert "shadowed" in caplog.text and "san_vit_b_16" in caplog.text
    assert f"{user_pkg}.models" not in sys.modules   # listed, not imported
    assert registry.get_builder("san_vit_b_16") is registry._BUILDERS["san_vit_b_16"]
    model = create_model("user_model", width=7)
    assert type(model).__name__ == "Mine" and model.width == 7
    fails("user_broken", "entry point ovseg_bench.models", f"module '{user_pkg}.models' has no attribute 'buidl'")


def test_entry_points_are_discovered_on_the_first_unknown_name(user_pkg, tmp_path, monkeypatch):
    install_entry_points(tmp_path, [f"user_model = {user_pkg}.models:build"])
    monkeypatch.setattr(registry, "_entry_points", None)
    assert type(create_model("user_model")).__name__ == "Mine"
    assert "user_model" in registry._entry_points


def test_the_package_registers_every_family():
    assert {"san_vit_b_16", "san_vit_large_14", "simseg_vit_b_16", "scan_vit_l_14",
            "scan_vit_b_16"} <= set(list_models())
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model("san_vit_b_16")(lambda: None)

