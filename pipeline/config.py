"""The run configuration: a YAML recipe + dotted ``key=value`` overrides -> a typed ``RunConfig``.

Each component owns its section next to its code (``DataConfig`` in data/config.py,
``OptimConfig`` in training/optim.py, ...); this module composes them, loads YAML, applies
overrides and reports problems. pydantic checks the types (pipeline/section.py); every problem
(unknown key, wrong type, bad value) is collected and raised once as a ``ConfigError`` whose
lines name the dotted key, e.g. ``train.max_stepz: unknown key (did you mean train.max_steps?)``.

Two sections are free-form on purpose:
- ``model``: ``family`` (pipeline/registry.py), ``preset`` and any field of the family's config
  class (``model.config.GPT2Config`` / ``EncDecConfig``), type-checked against that class.
- ``deepspeed``: overrides merged into the DeepSpeed config file (``deepspeed_config``), e.g.
  ``deepspeed.zero_optimization.stage=2``; checked when merged (training/ds_config.py).

Shipped recipes and the default DeepSpeed config live in the package ``zeroforge.configs`` (the
repository's ``configs/``), found through ``importlib.resources``, so they work from a wheel too.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from zeroforge.data_prep.locations import local_path_problem
from zeroforge.data_prep.store import StoreError, TokenStore
from zeroforge.pipeline import registry
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.registry import ModelConfig
from zeroforge.pipeline.results.eval_config import EvalConfig
from zeroforge.pipeline.section import Section
from zeroforge.pipeline.tracking.base import TrackingConfig
from zeroforge.pipeline.training.config import CheckpointConfig, DistConfig, TrainConfig
from zeroforge.pipeline.training.ds_config import Device, merge_ds_config
from zeroforge.pipeline.training.optim import OptimConfig

DEFAULT_DS_CONFIG = "ds_config.json"
SHIPPED = importlib.resources.files("zeroforge.configs")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``3e-4`` is a float (as in YAML 1.2), not a
    string: recipes write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


class ModelSpec(BaseModel):
    """``model``: the family, an optional preset, and field overrides of the family's config."""

    family: str = "gpt2"
    preset: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)

    def build(self) -> ModelConfig:
        cls = registry.family(self.family).config_cls
        if self.preset is not None:
            return cls.preset(self.preset, **self.fields)
        return cls(**self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "preset": self.preset, **self.fields}


class RunConfig(Section):
    """One training run (the YAML file's top level)."""

    run_dir: str = "runs/default"  # checkpoints, resolved configs, metrics.jsonl, logs
    # The recipe's name (set from the --config file's name when the YAML has none): it names
    # the MLflow run.
    recipe: str | None = None
    # A path (relative: to the working directory), or the name of a shipped DeepSpeed config.
    deepspeed_config: str = DEFAULT_DS_CONFIG
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # overrides into deepspeed_config
    # Start from these weights (a checkpoint, run dir or HF directory) with a fresh optimizer;
    # ignored once the run has checkpoints of its own (it resumes from them).
    init_from: str | None = None
    task: str | None = None  # pipeline/registry.py; None: the model family's default task
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dist: DistConfig = Field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(exclude={"model"}), "model": self.model.to_dict()}

    def config_hash(self) -> str:
        """Stable id of the resolved config (recorded in checkpoints; informational)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def build_model_config(self) -> ModelConfig:
        return self.model.build()

    @property
    def task_name(self) -> str:
        return registry.task_name(self.model.family, self.task)

    def ds_config_path(self) -> Path:
        """``deepspeed_config`` as a path: a file here, else the shipped config of that name."""
        p = Path(self.deepspeed_config)
        if p.is_absolute() or p.exists():
            return p
        shipped = SHIPPED / p.name
        return Path(str(shipped)) if p.parent == Path(".") and shipped.is_file() else p

    def ds_config(self, world_size: int, device: Device) -> dict[str, Any]:
        """The merged DeepSpeed config of this run on ``world_size`` ranks of ``device``."""
        return merge_ds_config(self.ds_config_path(), self.deepspeed, self.train, self.optim,
                               world_size, device)

    def with_grad_accum(self, grad_accum: int) -> RunConfig:
        return self.model_copy(update={"train": self.train.model_copy(
            update={"grad_accum": grad_accum})})


# ----------------------------------------------------------------------------- problems


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true/false",
               "string": "a string", "list": "a list", "dict": "a mapping", "model": "a mapping",
               "model_attributes": "a mapping", "dataclass": "a mapping"}


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unknown(key: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"{prefix}{key}: unknown key{hint}; known keys: {', '.join(sorted(known))}"


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    cls: Any = RunConfig
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def _describe(error: dict[str, Any]) -> str:
    """One pydantic finding as a line naming the dotted key."""
    loc = tuple(error["loc"])
    key, kind = _dotted(loc), error["type"]
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1])
        known = list(section.model_fields) if section is not None else []
        prefix = _dotted(loc[:-1]) + "." if len(loc) > 1 else ""
        return _unknown(str(loc[-1]), known, prefix)
    expected = _TYPE_WORDS.get(kind.removesuffix("_type").removesuffix("_parsing"))
    if expected is not None:
        value = error.get("input")
        return f"{key}: expected {expected}, got {type(value).__name__} {value!r}"
    return f"{key}: {error['msg']}"


def _check_fields(cls: type, data: dict[str, Any], prefix: str, extra_known: list[str],
                  problems: list[str]) -> dict[str, Any]:
    """The entries of ``data`` that are well-typed fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for k, v in data.items():
        if k not in names:
            problems.append(_unknown(str(k), names + extra_known, prefix))
            continue
        try:
            out[k] = TypeAdapter(hints[k]).validate_python(v, strict=True)
        except ValidationError as e:
            problems += [_describe({**err, "loc": (f"{prefix}{k}", *err["loc"])})
                         for err in e.errors()]
    return out


def _store_vocabulary(data: Any) -> tuple[int, str] | None:
    """(vocabulary size, ``N tokens (tokenizer T) of the token store S``) of the run's first
    store, if its metadata can be read; None otherwise."""
    data = data if isinstance(data, dict) else {}
    mixture = data.get("mixture") or []
    path = data.get("store") or (mixture[0].get("store") if mixture and
                                 isinstance(mixture[0], dict) else None)
    if not isinstance(path, str):
        return None
    try:  # local or s3:// (only on this error path: a remote store costs a few requests)
        store = TokenStore.open(path, check_shards=False)
    except (StoreError, OSError):
        return None
    store.close()
    return store.vocab_size, (f"{store.vocab_size} tokens (tokenizer {store.tokenizer}) of the "
                              f"token store {path}")


def _model_spec(data: Any, problems: list[str], data_section: Any = None) -> ModelSpec:
    if not isinstance(data, dict):
        problems.append(f"model: expected a mapping, got {type(data).__name__} {data!r}")
        return ModelSpec()
    data = dict(data)
    family_name = data.pop("family", "gpt2")
    preset = data.pop("preset", None)
    if family_name not in registry.FAMILIES:
        problems.append(f"model.family: must be one of {sorted(registry.FAMILIES)}, got "
                        f"{family_name!r}")
        return ModelSpec()
    cls = registry.FAMILIES[family_name].config_cls
    if preset is not None and preset not in cls.PRESETS:
        problems.append(f"model.preset: unknown {family_name} preset {preset!r}; choose one of "
                        f"{sorted(cls.PRESETS)}")
        preset = None
    before = len(problems)
    fields = _check_fields(cls, data, "model.", ["family", "preset"], problems)
    spec = ModelSpec(family=family_name, preset=preset, fields=fields)
    if len(problems) == before:
        try:
            spec.build()
        except (TypeError, ValueError) as e:
            vocab = _store_vocabulary(data_section) if "vocab_size" in fields else None
            if vocab is not None and fields["vocab_size"] < vocab[0]:
                # The special ids no longer fit: say what vocab_size has to hold.
                problems.append(f"model.vocab_size: {fields['vocab_size']} is smaller than the "
                                f"{vocab[1]}; remove the override or raise it ({e})")
            else:
                problems.append(f"model: {e}")
    return spec


def _value_problems(cfg: RunConfig) -> list[str]:
    p: list[str] = []
    for section in (cfg.data, cfg.train, cfg.optim, cfg.checkpoint, cfg.tracking, cfg.eval,
                    cfg.dist):
        p += section.problems()
    if not cfg.run_dir:
        p.append("run_dir must be a directory path")
    # Run directories, checkpoints and init weights are local: a URL must not become a folder.
    for key, value in (("run_dir", cfg.run_dir), ("checkpoint.dir", cfg.checkpoint.dir),
                       ("init_from", cfg.init_from)):
        if value and local_path_problem(value, key):
            p.append(local_path_problem(value, key))
        elif key != "init_from" and value and Path(value).exists() and not Path(value).is_dir():
            p.append(f"{key}: {value} is a file, not a directory")
    if not cfg.ds_config_path().is_file():
        p.append(f"deepspeed_config: no such file {cfg.deepspeed_config!r}")
    try:
        registry.task_name(cfg.model.family, cfg.task)
    except ConfigError as e:
        p.append(str(e))
    if not p:
        p += _layout_problems(cfg)
    return p


def _layout_problems(cfg: RunConfig) -> list[str]:
    """The task's windows against the model (e.g. ``data.seq_len`` past the context), found
    before any rank starts rather than inside the first forward."""
    try:
        model_config = cfg.build_model_config()
    except (TypeError, ValueError):  # no model fields at all: setup reports it
        return []
    try:
        task = registry.make_task(cfg.task_name, cfg.data, model_config)
    except ConfigError as e:
        return [str(e)]
    return registry.input_problems(model_config, task.layout)


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """Typed ``RunConfig`` from a plain mapping; raises one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got "
                          f"{type(data).__name__}")
    problems: list[str] = []
    rest = {k: v for k, v in data.items() if k != "model"}
    spec = _model_spec(data["model"], problems, data.get("data")) if "model" in data else ModelSpec()
    try:
        cfg = RunConfig.model_validate({**rest, "model": spec})
    except ValidationError as e:
        problems += [_describe(err) for err in e.errors()]
        cfg = None
    if cfg is not None and not problems:
        problems += _value_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(f"invalid run config: {problems[0]}")
    if problems:  # one line each
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))
    assert cfg is not None
    return cfg


# ----------------------------------------------------------------------------- loading


def shipped_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in SHIPPED.iterdir()
                  if p.name.endswith(".yaml"))


def find_config_file(name: str) -> Path:
    """``name`` as a path, else the shipped recipe ``<name>`` / ``<name>.yaml``."""
    p = Path(name)
    if p.is_file():
        return p
    if p.parent == Path("."):
        for cand in (SHIPPED / name, SHIPPED / f"{name}.yaml"):
            if cand.is_file():
                return Path(str(cand))
    raise ConfigError(f"--config: no file {name!r} and no shipped recipe of that name "
                      f"(shipped: {', '.join(shipped_recipes())})")


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.max_steps=50")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
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
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a "
                                  "section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_run_config(config: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe (path or shipped name), apply overrides, validate, return it."""
    path = find_config_file(config)
    data = apply_overrides({"recipe": path.stem, **load_yaml(path)}, list(overrides or []))
    try:
        return build_run_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
