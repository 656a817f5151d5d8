"""The one config builder: nested plain data and ``--set`` overrides into frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lifelong.core.config import apply_overrides, build, load_file, parse_set
from lifelong.core.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    n: int = 1
    dims: tuple[int, ...] = (4, 2)
    rate: float = 0.5

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ConfigError(f"n must be >= 0, got {self.n}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "a"
    pair: tuple[int, int] | None = None
    flag: bool = False


def test_nested_keys_lists_to_tuples_and_defaults():
    cfg = build(Outer, {"inner": {"dims": [8, 4, 2], "rate": 1}, "pair": [1, 2]})
    assert cfg == Outer(inner=Inner(dims=(8, 4, 2), rate=1.0), pair=(1, 2))
    assert isinstance(cfg.inner.dims, tuple) and isinstance(cfg.inner.rate, float)
    assert build(Outer) == Outer()


def test_unknown_key_is_one_error_naming_the_dotted_key():
    with pytest.raises(ConfigError) as err:
        build(Outer, {"inner": {"m": 3}})
    assert str(err.value) == "inner.m: no such key; valid keys are n, dims, rate"
    with pytest.raises(ConfigError, match=r"^nme: no such key \(did you mean name\?\)"):
        build(Outer, {}, ["nme=b"])
    with pytest.raises(ConfigError, match=r"^inner.x.y: no such key|^inner.x: no such key"):
        build(Outer, {}, ["inner.x.y=1"])


@pytest.mark.parametrize("override, needle", [
    ("inner.n=true", "inner.n: input should be a valid integer"),
    ("inner.n=1.5", "inner.n: input should be a valid integer"),
    ("inner.rate=yes", "inner.rate: input should be a valid number"),
    ("inner.dims=[1, x]", "inner.dims[1]: input should be a valid integer"),
    ("inner=3", "inner: is a section"),
    ("name.x=1", "name: is a value, not a section"),
    ("pair=[1, 2, 3]", "pair: tuple should have at most 2 items"),
    ("inner.n=-1", "n must be >= 0"),  # the config's own check
    ("no_equals", "not of the form key=value"),
])
def test_bad_values_are_config_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        build(Outer, {}, [override])
    assert needle in str(err.value)


def test_set_overrides_the_file_and_values_are_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: from-file\ninner:\n  n: 2\n  rate: 1e-3\n")
    cfg = build(Outer, load_file(f), ["inner.n=5", "inner.dims=[16, 8]", "flag=true", "pair=null"])
    assert cfg == Outer(inner=Inner(n=5, dims=(16, 8), rate=0.001), name="from-file", flag=True)
    assert parse_set("a.b=1e-4") == ("a.b", 1e-4) and parse_set("a=x=y") == ("a", "x=y")
    assert build(Outer, {}, ["inner={n: 7}"]).inner == Inner(n=7)  # a mapping merges into the section


def test_apply_overrides_updates_an_existing_config():
    base = Outer(inner=Inner(n=3), name="b")
    cfg = apply_overrides(base, {"inner": {"rate": 2}})
    assert cfg == Outer(inner=Inner(n=3, rate=2.0), name="b")
    with pytest.raises(ConfigError, match=r"^model\.inner\.q: no such key"):
        apply_overrides(base, {"inner": {"q": 1}}, prefix="model")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_file(tmp_path / "missing.yaml")
    (tmp_path / "l.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_file(tmp_path / "l.yaml")
