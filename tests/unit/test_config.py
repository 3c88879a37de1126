"""Config: defaults file, overrides, and errors that name the key."""

import dataclasses
import time

import pytest
import yaml
from torch import nn

import torchdiag
from torchdiag.config import DEFAULTS_PATH, Config


def test_every_default_key_has_a_reason_comment():
    lines = DEFAULTS_PATH.read_text().splitlines()
    data = yaml.safe_load(DEFAULTS_PATH.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(Config)}
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#")) and ":" in line:
            # a reason on the line itself or in the comment block just above
            assert "#" in line or lines[i - 1].startswith("#"), line


def test_yaml_overrides_a_subset_and_kwargs_override_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("every: 5\ndead_fraction: 0.8\n")
    cfg = Config.from_yaml(p)
    assert cfg.every == 5 and cfg.dead_fraction == 0.8
    assert cfg.exploding_ratio == Config.defaults().exploding_ratio
    import torch

    w = torchdiag.watch(torch.nn.Linear(2, 2), config=str(p), every=7)
    assert w.config.every == 7 and w.config.dead_fraction == 0.8


@pytest.mark.parametrize(
    "d, match",
    [
        ({"every": 0}, r"'every' expects an integer >= 1, or 'auto'"),
        ({"every": "3"}, r"'every' expects an integer"),
        ({"dead_fraction": 1.5}, r"'dead_fraction' expects a number in \(0.0, 1.0\], got 1.5"),
        ({"warnings": "yes"}, r"'warnings' expects true or false"),
        ({"include": [1]}, r"'include' expects a list of strings"),
        ({"defer_report": True}, r"'defer_report' expects one of 'auto', 'always', 'never', got True"),
        ({"vanishing_ratio": 0.5, "exploding_ratio": 1.0}, r"exploding_ratio"),
        ({"bogus": 1}, r"unknown key 'bogus'; allowed keys are .*every"),
    ],
)
def test_bad_values_name_the_key(d, match):
    with pytest.raises(torchdiag.ConfigError, match=match):
        Config.from_dict(d)


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("every: 2\ninclude: [a, b\nexclude: []\n")
    with pytest.raises(torchdiag.ConfigError, match=r"bad.yaml, line \d+"):
        Config.from_yaml(p)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(torchdiag.ConfigError, match="cannot read config file"):
        Config.from_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(torchdiag.ConfigError, match="mapping"):
        Config.from_yaml(p)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config.defaults().every = 3


def test_a_key_given_twice_in_a_yaml_file_is_rejected_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("every: 2\nhistogram_every: 5\nevery: 3\n")
    with pytest.raises(torchdiag.ConfigError, match=r"dup.yaml, line 3.*duplicate key 'every'"):
        Config.from_yaml(path)


def test_a_yaml_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("every: 2\n# r\xe9glage\n".encode("latin-1"))
    with pytest.raises(torchdiag.ConfigError, match=r"latin1.yaml.*line 2: not UTF-8"):
        Config.from_yaml(path)


def _alias_bomb(levels: int = 9) -> str:
    """``- &a [1, ... 1]``, ``- &b [*a, ... *a]``, ...: 9 ** levels values once expanded, a few hundred as loaded."""
    names = "abcdefghijklmnopqrstuvwxyz"
    lines = ["  - &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"  - &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines)


def test_a_yaml_alias_bomb_under_a_known_key_is_refused_at_once_naming_the_key(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("every: 2\ninclude:\n" + _alias_bomb() + "\n")
    start = time.perf_counter()
    with pytest.raises(torchdiag.ConfigError, match="key 'include'") as err:
        torchdiag.watch(nn.Linear(2, 2), config=str(path))
    assert time.perf_counter() - start < 1.0
    assert "aliases" in str(err.value) and len(str(err.value)) < 1000


def test_a_nested_value_in_an_error_message_is_truncated_and_the_error_names_the_key():
    nested = [1] * 9
    for _ in range(8):
        nested = [nested] * 9  # shared references: 9**9 values in repr
    start = time.perf_counter()
    with pytest.raises(torchdiag.ConfigError, match="key 'include' expects a list of strings") as err:
        torchdiag.watch(nn.Linear(2, 2), config={"include": nested})
    assert time.perf_counter() - start < 1.0 and len(str(err.value)) < 1000
