"""bench.cli: the one key=value parser of bench.fetch and bench.data.{synth,prepare,check}."""
import pytest

from bench import BenchError
from bench.cli import error, parse_overrides

KEYS = {"root": str, "n": int, "force": bool, "names": list}


def test_kinds_plus_prefix_and_unset():
    opts, rest = parse_overrides(["root=/a=b", "+n=3", "force=Yes", "names=[x, 'y']"], KEYS, "usage")
    assert opts == {"root": "/a=b", "n": 3, "force": True, "names": ["x", "y"]} and rest == []
    assert parse_overrides(["names=a,b", "force=0"], KEYS, "u")[0] == {"names": ["a", "b"], "force": False}
    assert parse_overrides(["n=3", "n="], KEYS, "u")[0] == {}            # `key=` unsets (the default applies)


@pytest.mark.parametrize("argv, message", [
    (["n=three"], "n=three: expected an integer"),
    (["force=maybe"], "force=maybe: expected true or false"),
    (["--root", "/x"], "unexpected argument '--root': use key=value (usage)"),
    (["root"], "root: expected root=VALUE"),
    (["colour=red", "root=/x", "size=2"], "unknown argument(s) ['colour', 'size']; allowed: "
                                          "['force', 'n', 'names', 'root']"),
])
def test_bad_arguments_fail_in_one_line(argv, message):
    with pytest.raises(BenchError) as e:
        parse_overrides(argv, KEYS, "usage")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_passthrough_keeps_order_and_error_exits_2(capsys):
    opts, rest = parse_overrides(["model=san_l", "n=1", "~x", "dataset.a=1"], KEYS, "u",
                                 passthrough=lambda a: "=" in a or a.startswith("~"))
    assert opts == {"n": 1} and rest == ["model=san_l", "~x", "dataset.a=1"]
    assert error(BenchError("bad thing")) == 2 and error("other", 1) == 1
    assert capsys.readouterr().err == "error: bad thing\nerror: other\n"
