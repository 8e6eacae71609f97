import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Tuple

import pytest

from bcu.config import check, deep_merge, from_dict, load_file, parse_overrides, replace
from bcu.defenses.bcu import CleanseConfig, preset
from bcu.errors import ConfigError


@dataclass
class Inner:
    a: int = 1
    b: float = 0.5


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    mode: Literal["x", "y"] = "x"
    ratios: Tuple[float, ...] = (0.1, 0.2)
    maybe: Optional[int] = None
    table: Dict[str, float] = field(default_factory=dict)
    flag: bool = False

    def __post_init__(self):
        check(self.inner.a >= 0, "inner.a must be >= 0")


def test_from_dict_coerces_nested_values():
    cfg = from_dict(Outer, {"inner": {"a": "3", "b": 1}, "mode": "y", "ratios": "0.5, 0.25",
                            "maybe": "7", "table": {"k": "0.3"}, "flag": "yes"})
    assert cfg.inner.a == 3 and cfg.inner.b == 1.0 and cfg.mode == "y"
    assert cfg.ratios == (0.5, 0.25) and cfg.maybe == 7 and cfg.table == {"k": 0.3} and cfg.flag is True


@pytest.mark.parametrize("bad, fragment", [
    ({"nope": 1}, "unknown option nope"),
    ({"inner": {"zz": 1}}, "unknown option inner.zz"),
    ({"mode": "z"}, "mode"),
    ({"inner": {"a": "x"}}, "inner.a"),
    ({"inner": {"a": 1.5}}, "inner.a"),
    ({"inner": {"b": "nan"}}, "finite"),
    ({"flag": "maybe"}, "flag"),
    ({"inner": {"a": -1}}, "inner.a must be >= 0"),
    ({"inner": 3}, "table"),
])
def test_from_dict_rejects_bad_values(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(Outer, bad)


def test_round_trip_and_replace():
    cfg = from_dict(Outer, {"inner": {"a": 2}})
    assert from_dict(Outer, dataclasses.asdict(cfg)) == cfg
    assert replace(cfg, {"inner": {"b": 2.0}}).inner == Inner(2, 2.0)


def test_parse_overrides_builds_nested_dict():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=true", "e=text"]) == {
        "a": {"b": 1, "c": [1, 2]}, "d": True, "e": "text"}
    for bad in ["novalue", "=3", "a..b=1"]:
        with pytest.raises(ConfigError):
            parse_overrides([bad])


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


@pytest.mark.parametrize("name, text", [
    ("c.yaml", "optim:\n  epochs: 7\n"),
    ("c.toml", "[optim]\nepochs = 7\n"),
    ("c.json", '{"optim": {"epochs": 7}}'),
])
def test_load_file_formats(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    assert preset("paper", load_file(p)).optim.epochs == 7


@pytest.mark.parametrize("text", ["optim: [unclosed", "- a list\n- at top\n"])
def test_load_file_rejects_bad_files(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        load_file(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.yaml")


def test_paper_preset_is_the_authors_settings():
    c = preset("paper")
    assert c.reinit.stem == 0.01 and c.reinit.stages == (0.01, 0.03, 0.09, 0.27) and c.reinit.head == 0.10
    assert c.reinit.scale == 1.0
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.batch_size, c.optim.epochs) == (
        0.01, 0.9, 5e-4, 256, 100)
    assert c.optim.schedule == "cosine" and c.augment.crop_pad == 4 and c.augment.hflip
    assert [c.distill.temperature(e, 100) for e in (0, 49, 99)] == [1.03, 2.5, 4.0]
    assert c.distill.mixup_alpha == 0 and c.distill.noise_blend == 0 and not c.distill.t_squared and c.stop.rule == "none"


def test_cleanse_config_validation():
    with pytest.raises(ConfigError):
        preset("paper", {"reinit": {"head": 1.5}})
    with pytest.raises(ConfigError):
        preset("paper", {"optim": {"epochs": 0}})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    assert isinstance(preset("default"), CleanseConfig)


def test_default_preset_is_the_measured_one():
    c = preset("default")
    assert c.reinit.scale == 4.0 and c.reinit.max_ratio == 0.9
    assert c.distill.t_squared and c.distill.mixup_alpha == 0.0 and c.distill.noise_blend == 0.2
    assert (c.optim.epochs, c.optim.lr, c.optim.batch_size) == (100, 0.01, 256)


# -------------------------------------------------------------------------------------------------
# issue 14, finding 14: every Python the package claims can read TOML configs


def test_toml_support_covers_every_python_the_package_claims():
    """pyproject claimed >= 3.10 while config.py imported tomllib (3.11+) inside a broad except,
    so every .toml config failed on 3.10 as "not valid toml". bcu now claims >= 3.11 (the only
    versions it is tested on); a claim of 3.10 would need the tomli fallback declared."""
    import re
    import sys
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    m = re.fullmatch(r">=\s*3\.(\d+)", meta["requires-python"].strip())
    assert m, meta["requires-python"]
    minor = int(m.group(1))
    assert minor >= 11 or any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in
                              d.replace(" ", "").replace('"', "'") for d in meta["dependencies"])
    assert sys.version_info >= (3, minor)


def test_a_missing_toml_parser_is_an_import_error_not_an_invalid_file(tmp_path):
    """The import is at module level: without tomllib bcu.config cannot be imported at all (a clear
    ImportError), instead of reporting each valid .toml file as "not valid toml"."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['tomllib'] = None\n"
            "try:\n    import bcu.config\nexcept ImportError:\n    print('import error')\n"
            "else:\n    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "import error", out.stdout + out.stderr
