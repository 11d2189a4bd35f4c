"""The run configuration: YAML recipe + dotted ``key=value`` overrides -> typed ``RunConfig``.

Each component owns its small dataclass next to its code (``DataConfig`` in pipeline/data.py,
``OptimConfig`` in pipeline/optim.py, ...); this module only composes them, loads YAML, applies
overrides and checks types. Every problem (unknown key, wrong type, bad value) is collected and
raised once as a ``ValueError`` whose lines name the dotted key, e.g.
``train.max_stepz: unknown key (did you mean train.max_steps?)``.

Two sections are free-form on purpose:
- ``model``: ``family`` (gpt2 | encdec), ``preset`` and any field of the family's config class
  (``model.config.GPT2Config`` / ``EncDecConfig``), type-checked against that class.
- ``deepspeed``: overrides merged into the DeepSpeed config file (``deepspeed_config``), e.g.
  ``deepspeed.zero_optimization.stage=2``; checked by pipeline/engine.py when merged.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import EncDecConfig, GPT2Config
from pipeline.checkpoint import CheckpointConfig
from pipeline.data import DataConfig
from pipeline.optim import OptimConfig
from pipeline.tracking import TrackingConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_DS_CONFIG = "ds_config.json"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MODEL_FAMILIES: dict[str, type] = {"gpt2": GPT2Config, "encdec": EncDecConfig}
TASK_OF_FAMILY = {"gpt2": "gpt", "encdec": "t5"}
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass
class TrainConfig:
    """The step loop (YAML key ``train``)."""

    max_steps: int = 1000  # optimizer steps (skipped non-finite steps count too)
    seed: int = 1234  # model init, data order, dropout
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "auto"  # auto (bf16 on a bf16-capable GPU, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model before handing it to DeepSpeed
    log_every: int = 1  # metrics.jsonl / tracker / progress line every N steps
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int | None = None  # None: micro_batch_size
    early_stopping_patience: int = 0  # stop after N evals without improvement; 0: off
    early_stopping_min_delta: float = 0.0  # improvement smaller than this does not count
    max_nonfinite_in_a_row: int = 3  # more consecutive skipped (non-finite) steps: stop
    sample_prompts: list[str] = field(default_factory=lambda: ["The", "Once upon a time"])
    sample_tokens: int = 32  # GPT: greedy + top-k continuations logged at each eval; 0: off

    def validate(self) -> list[str]:
        p = []
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "early_stopping_patience", "max_nonfinite_in_a_row",
                     "sample_tokens"):
            if getattr(self, name) < 0:
                p.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            p.append(f"train.eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.precision not in PRECISIONS:
            p.append(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.early_stopping_patience and not self.eval_every:
            p.append("train.early_stopping_patience needs train.eval_every > 0")
        return p


@dataclass
class ModelSpec:
    """``model``: the family, an optional preset, and field overrides of the family's config."""

    family: str = "gpt2"
    preset: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return TASK_OF_FAMILY[self.family]

    def build(self) -> GPT2Config | EncDecConfig:
        cls = MODEL_FAMILIES[self.family]
        if self.preset is not None:
            return cls.preset(self.preset, **self.fields)
        return cls(**self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "preset": self.preset, **self.fields}


@dataclass
class RunConfig:
    """One training run (the YAML file's top level)."""

    run_dir: str = "runs/default"  # checkpoints, resolved configs, metrics.jsonl, logs
    deepspeed_config: str = DEFAULT_DS_CONFIG  # path; relative: to the CWD, then the repo root
    deepspeed: dict[str, Any] = field(default_factory=dict)  # overrides into deepspeed_config
    # Start from these weights (a checkpoint, run dir or HF directory) with a fresh optimizer;
    # ignored once the run has checkpoints of its own (it resumes from them).
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, ModelSpec):
                out[k] = v.to_dict()
            elif dataclasses.is_dataclass(v):
                out[k] = dataclasses.asdict(v)
            else:
                out[k] = v
        return out

    def config_hash(self) -> str:
        """Stable id of the resolved config (recorded in checkpoints; informational)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def model_config(self) -> GPT2Config | EncDecConfig:
        return self.model.build()

    def resolve_ds_config_path(self) -> Path:
        p = Path(self.deepspeed_config)
        if p.is_absolute() or p.exists():
            return p
        return REPO_ROOT / p


# ----------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return ``value`` coerced to ``tp`` (only int -> float), or record a problem naming key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in inner:
            sub = []
            out = _check_value(value, a, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                        f"{value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return value
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value):
            return float(value)  # PyYAML (YAML 1.1) reads 3e-4 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {type(value).__name__} {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, problems)
    return value


def _unknown(key: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"{prefix}{key}: unknown key{hint}; known keys: {', '.join(sorted(known))}"


def _build_dataclass(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix}: expected a mapping, got {type(data).__name__} {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    dot = f"{prefix}." if prefix else ""
    for k, v in data.items():
        if k not in names:
            problems.append(_unknown(str(k), names, dot))
            continue
        kwargs[k] = _check_value(v, hints[k], f"{dot}{k}", problems)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        problems.append(f"{prefix or 'config'}: {e}")
        return cls()


def _build_model_spec(data: Any, problems: list[str]) -> ModelSpec:
    if not isinstance(data, dict):
        problems.append(f"model: expected a mapping, got {type(data).__name__} {data!r}")
        return ModelSpec()
    data = dict(data)
    family = data.pop("family", "gpt2")
    preset = data.pop("preset", None)
    if family not in MODEL_FAMILIES:
        problems.append(f"model.family: must be one of {sorted(MODEL_FAMILIES)}, got {family!r}")
        return ModelSpec()
    cls = MODEL_FAMILIES[family]
    if preset is not None and preset not in cls.PRESETS:
        problems.append(f"model.preset: unknown {family} preset {preset!r}; "
                        f"choose one of {sorted(cls.PRESETS)}")
        preset = None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    fields_: dict[str, Any] = {}
    before = len(problems)
    for k, v in data.items():
        if k not in names:
            problems.append(_unknown(str(k), names + ["family", "preset"], "model."))
            continue
        fields_[k] = _check_value(v, hints[k], f"model.{k}", problems)
    spec = ModelSpec(family=family, preset=preset, fields=fields_)
    if len(problems) == before:
        try:
            spec.build()
        except (TypeError, ValueError) as e:
            problems.append(f"model: {e}")
    return spec


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """Typed ``RunConfig`` from a plain mapping; raises one ValueError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    hints = typing.get_type_hints(RunConfig)
    names = [f.name for f in dataclasses.fields(RunConfig)]
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            problems.append(_unknown(str(k), names, ""))
        elif k == "model":
            kwargs[k] = _build_model_spec(v, problems)
        else:
            kwargs[k] = _check_value(v, hints[k], k, problems)
    cfg = RunConfig(**kwargs)
    if not problems:
        problems += _value_problems(cfg)
    if problems:
        raise ValueError("invalid run config:\n  " + "\n  ".join(problems))
    return cfg


def _value_problems(cfg: RunConfig) -> list[str]:
    p: list[str] = []
    p += cfg.data.validate()
    p += cfg.train.validate()
    p += cfg.optim.validate()
    p += cfg.checkpoint.validate()
    p += cfg.tracking.validate()
    if not cfg.run_dir:
        p.append("run_dir must be a directory path")
    if not cfg.resolve_ds_config_path().is_file():
        p.append(f"deepspeed_config: no such file {cfg.deepspeed_config!r}")
    return p


# ----------------------------------------------------------------------------- loading


def find_config_file(name: str) -> Path:
    """``name`` as a path, else ``configs/<name>.yaml`` of this checkout."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    shipped = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"--config: no file {name!r} and no shipped recipe of that name "
                     f"(shipped: {', '.join(shipped)})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected key=value, e.g. train.max_steps=50")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a copy of ``data`` (sections are created as needed; unknown keys
    are reported later by ``build_run_config`` with the same dotted name)."""
    out = json.loads(json.dumps(data, default=str))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_run_config(config: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe (path or shipped name), apply overrides, validate, return it."""
    path = find_config_file(config)
    data = apply_overrides(load_yaml(path), list(overrides or []))
    try:
        return build_run_config(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
