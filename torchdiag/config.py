"""Configuration: YAML or dict -> one frozen, validated ``Config``."""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")


@dataclass(frozen=True)
class Config:
    """Validated torchdiag settings; see ``defaults.yaml`` for every key and its reason.

    Example:
        >>> cfg = Config.from_dict({"every": 10})
        >>> cfg.every, cfg.dead_fraction
        (10, 0.9)
    """

    every: int | str  # an integer N, or "auto": the time budget
    budget: float
    record_first: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    include_types: tuple[str, ...]
    exclude_types: tuple[str, ...]
    min_repeats: int
    vanishing_ratio: float
    exploding_ratio: float
    normalized_ratio: float
    layer_step_ratio: float
    lone_layer_ratio: float
    drift_change_ratio: float
    jump_ratio: float
    dead_fraction: float
    saturation_level: float
    saturated_fraction: float
    scale_tolerance: float
    update_ratio_high: float
    update_ratio_low: float
    overflow_margin: float
    underflow_fraction: float
    finding_steps: int
    finding_window: int
    warnings: bool
    histogram_every: int
    profile_every: int
    overview_every: int
    layer_scalars: str
    defer_report: str
    nonfinite_origin: bool
    attention_rules: bool
    attention_sample: int
    attention_logit_max: float
    attention_entropy_min: float
    output_logits_rule: bool
    output_logz_max: float
    adam_epsilon_rule: bool
    adam_epsilon_factor: float
    loss_spike_sigma: float
    loss_spike_window: int
    loss_spike_min_steps: int
    forecast_horizon: int
    forecast_window: int

    @classmethod
    def defaults(cls) -> Config:
        return _DEFAULTS

    @classmethod
    def from_dict(cls, d: Mapping[str, object], *, base: Config | None = None, source: str = "config") -> Config:
        """Build a config from the defaults (or ``base``) overridden by the keys of ``d``."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(d).__name__}")
        base = _DEFAULTS if base is None else base
        allowed = {f.name for f in fields(cls)}
        values = dataclasses.asdict(base)
        for key, value in d.items():
            if key not in allowed:
                raise ConfigError(
                    f"{source}: unknown key {_short_repr(key)}; allowed keys are {', '.join(sorted(allowed))}"
                )
            values[key] = _coerce(key, value, source)
        cfg = cls(**values)
        _check_relations(cfg, source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, *, base: Config | None = None) -> Config:
        """Read a YAML file; its keys override the defaults."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError(f"config file {str(path)!r}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at"
                              f" offset {e.start}); save it as UTF-8") from None
        return cls.from_dict(_load_yaml(text, str(path)), base=base, source=str(path))

    def replace(self, **changes: object) -> Config:
        """A copy with some keys changed (validated like ``from_dict``)."""
        return Config.from_dict(changes, base=self, source="keyword argument")


ConfigLike = Union[Config, Mapping[str, object], str, Path, None]


def resolve_config(config: ConfigLike, **overrides: object) -> Config:
    """Turn the ``config=`` argument (path, dict, Config or None) into a Config, then apply overrides."""
    if config is None:
        cfg = _DEFAULTS
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = Config.from_dict(config)
    elif isinstance(config, (str, Path)):
        cfg = Config.from_yaml(config)
    else:
        raise ConfigError(
            f"config: expected a path to a YAML file, a dict or a torchdiag.Config, got {type(config).__name__}"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return Config.from_dict(overrides, base=cfg, source="keyword argument") if overrides else cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, yaml.Mark] = {}  # key -> where it was first given
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    f"while constructing a mapping (first given on line {first.line + 1})", node.start_mark,
                    f"duplicate key {_short_repr(key)}: each key may appear once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _load_yaml(text: str, source: str) -> dict[str, object]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise ConfigError(f"malformed YAML in {where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {source}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    sizes: dict[int, int] = {}
    for key, value in data.items():
        if _expanded_size(value, sizes) > MAX_EXPANDED_VALUES:
            raise ConfigError(f"{source}: key {_short_repr(key)}: its YAML aliases expand to more than"
                              f" {MAX_EXPANDED_VALUES:,} values (an alias bomb?); write the values out")
    return data


MAX_EXPANDED_VALUES = 100_000  # values a key's YAML may expand to through its aliases (&a ... *a)


def _expanded_size(value: object, sizes: dict[int, int]) -> int:
    """How many values ``value`` holds once its YAML aliases are expanded (a shared list counted at each use), in
    time linear in the distinct objects; a structure that contains itself counts as too large."""
    if not isinstance(value, (list, tuple, dict)):
        return 1
    known = sizes.get(id(value))
    if known is not None:
        return known
    sizes[id(value)] = MAX_EXPANDED_VALUES + 1  # while counting it: a recursive alias is too large
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _expanded_size(item, sizes)
        if total > MAX_EXPANDED_VALUES:
            break
    sizes[id(value)] = total = min(total, MAX_EXPANDED_VALUES + 1)
    return total


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 120, 120, 60


def _short_repr(value: object) -> str:
    """``repr`` bounded in length and in the work it does (a nested or aliased value: ``[[1, 2, ...], ...]``)."""
    text = _REPR.repr(value)
    return text if len(text) <= 200 else text[:196] + " ..."


def _coerce(key: str, value: object, source: str) -> Any:  # Any: its type is the key's (int, float, str, bool, strings)
    value_type = _VALUE_TYPES[key]

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key {key!r} expects {expected}, got {_short_repr(value)}"
                           f" ({type(value).__name__})")

    if value_type == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if value_type == "every":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("an integer >= 1, or 'auto' (as many steps as the time budget allows)")
        return value
    if value_type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        lo = _MIN_INT[key]
        if value < lo:
            raise bad(f"an integer >= {lo}")
        return value
    if value_type == "choice":
        allowed = _CHOICES[key]
        if value not in allowed:
            raise bad("one of " + ", ".join(repr(a) for a in allowed))
        return value
    if value_type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        low, high = _FLOAT_RANGE[key]  # floats: not the int branch's lo
        if not low < value <= high:
            raise bad(f"a number in [0, {high}]" if low < 0 else f"a number in ({low}, {high}]")
        return float(value)
    # list of strings
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise bad("a list of strings")
    return tuple(value)


def _check_relations(cfg: Config, source: str) -> None:
    if not 0 <= cfg.update_ratio_low < cfg.update_ratio_high:
        raise ConfigError(
            f"{source}: keys 'update_ratio_low' and 'update_ratio_high' must satisfy low < high, got "
            f"{cfg.update_ratio_low} and {cfg.update_ratio_high}"
        )
    if not cfg.vanishing_ratio < 1.0 < cfg.exploding_ratio:
        raise ConfigError(
            f"{source}: keys 'vanishing_ratio' and 'exploding_ratio' must satisfy vanishing_ratio < 1 < "
            f"exploding_ratio, got {cfg.vanishing_ratio} and {cfg.exploding_ratio}"
        )
    if cfg.finding_steps > cfg.finding_window:
        raise ConfigError(
            f"{source}: keys 'finding_steps' and 'finding_window' must satisfy finding_steps <= finding_window, got "
            f"{cfg.finding_steps} and {cfg.finding_window}"
        )


_VALUE_TYPES = {
    "every": "every",
    "budget": "float",
    "record_first": "int",
    "include": "strs",
    "exclude": "strs",
    "include_types": "strs",
    "exclude_types": "strs",
    "min_repeats": "int",
    "vanishing_ratio": "float",
    "exploding_ratio": "float",
    "normalized_ratio": "float",
    "layer_step_ratio": "float",
    "lone_layer_ratio": "float",
    "drift_change_ratio": "float",
    "jump_ratio": "float",
    "dead_fraction": "float",
    "saturation_level": "float",
    "saturated_fraction": "float",
    "scale_tolerance": "float",
    "update_ratio_high": "float",
    "update_ratio_low": "float",
    "overflow_margin": "float",
    "underflow_fraction": "float",
    "finding_steps": "int",
    "finding_window": "int",
    "warnings": "bool",
    "histogram_every": "int",
    "profile_every": "int",
    "overview_every": "int",
    "layer_scalars": "choice",
    "defer_report": "choice",
    "nonfinite_origin": "bool",
    "attention_rules": "bool",
    "attention_sample": "int",
    "attention_logit_max": "float",
    "attention_entropy_min": "float",
    "output_logits_rule": "bool",
    "output_logz_max": "float",
    "adam_epsilon_rule": "bool",
    "adam_epsilon_factor": "float",
    "loss_spike_sigma": "float",
    "loss_spike_window": "int",
    "loss_spike_min_steps": "int",
    "forecast_horizon": "int",
    "forecast_window": "int",
}
_CHOICES = {"defer_report": ("auto", "always", "never"), "layer_scalars": ("core", "all")}
_MIN_INT = {"every": 1, "record_first": 1,
            "min_repeats": 2, "finding_steps": 1, "finding_window": 1, "histogram_every": 0,
            "profile_every": 0, "overview_every": 0, "attention_sample": 1, "loss_spike_window": 2,
            "loss_spike_min_steps": 2, "forecast_horizon": 0, "forecast_window": 3}
_FLOAT_RANGE = {
    "budget": (0.0, 1.0),
    "vanishing_ratio": (0.0, 1.0),
    "exploding_ratio": (1.0, math.inf),
    "normalized_ratio": (1.0, math.inf),
    "layer_step_ratio": (1.0, math.inf),
    "lone_layer_ratio": (1.0, math.inf),
    "drift_change_ratio": (1.0, math.inf),
    "jump_ratio": (1.0, math.inf),
    "dead_fraction": (0.0, 1.0),
    "saturation_level": (0.0, 1.0),
    "saturated_fraction": (0.0, 1.0),
    "scale_tolerance": (0.0, math.inf),
    "update_ratio_high": (0.0, math.inf),
    "update_ratio_low": (-1e-300, 1.0),  # 0 turns the low side off
    "overflow_margin": (1.0, math.inf),
    "underflow_fraction": (0.0, 1.0),
    "attention_logit_max": (0.0, math.inf),
    "attention_entropy_min": (-1e-300, 1.0),  # 0 turns it off
    "output_logz_max": (0.0, math.inf),
    "adam_epsilon_factor": (-1e-300, math.inf),  # 0 turns it off
    "loss_spike_sigma": (0.0, math.inf),
}


def _load_defaults() -> Config:
    data = _load_yaml(DEFAULTS_PATH.read_text(), str(DEFAULTS_PATH))
    missing = {f.name for f in fields(Config)} - set(data)
    if missing:  # pragma: no cover - guards the shipped file
        raise ConfigError(f"{DEFAULTS_PATH}: missing keys {sorted(missing)}")
    values = {k: _coerce(k, v, str(DEFAULTS_PATH)) for k, v in data.items()}
    return Config(**values)


_DEFAULTS = _load_defaults()
