"""Model weights out of a training checkpoint, in one process, without a DeepSpeed engine.

``zeroforge sample``, ``zeroforge export``, single-process ``zeroforge eval`` and ``init_from``
all start here. A checkpoint is named by any of

    <run_dir>                               the newest committed checkpoint of the run
    <run_dir>/checkpoints                   the same (any ``checkpoint.dir``)
    <run_dir>/checkpoints/step_00000020     that checkpoint (it must be committed)

The weights are fp32 whatever the training precision or ZeRO stage: stage 1-3 checkpoints are
consolidated from the optimizer's fp32 master partitions with DeepSpeed's own
``zero_to_fp32`` (CPU only, any number of shards; ZeRO-3 keeps no full weights anywhere else).
Stage 0 saves the whole module and optimizer in ``mp_rank_00_model_states.pt``; in bf16/fp16
the module is a rounded copy, so the weights come from the optimizer's fp32 masters (per
parameter group, in ``training.optim.param_groups`` order: flat with DeepSpeed's FusedAdam, one
tensor per parameter with torch's AdamW), in fp32 from the module itself. The model config, the run
config and the tokenizer come from the client state that training saves with every checkpoint
(training/loop.py), so nothing else has to travel with the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from zeroforge.data_prep.store import StoreError, TokenStore
from zeroforge.pipeline import registry
from zeroforge.pipeline.errors import ConfigError, ZeroforgeError
from zeroforge.pipeline.registry import ModelConfig
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training.optim import param_groups

log = logging.getLogger(__name__)


class CheckpointError(ZeroforgeError, ValueError):
    """A checkpoint that is missing, uncommitted or unreadable (exit code 1)."""

# Written by ``zeroforge export`` beside HF's config.json: where the weights came from.
EXPORT_SOURCE = "zeroforge_source.json"



@dataclass
class CheckpointInfo:
    """What a committed checkpoint says about itself (from its client state)."""

    tag_dir: Path
    step: int
    family: registry.Family
    model_config: ModelConfig
    tokenizer: str | None  # None: neither the checkpoint nor its token store says
    store_fingerprint: str | None
    zero_stage: int
    run_config: dict[str, Any] = field(default_factory=dict)
    tracking_run_id: str | None = None  # the MLflow run that wrote it (None: not tracked)
    # The data loader's order identity (training/loop.py saves it): the task's settings, e.g.
    # the fine-tuning store's examples description with its template.
    data_order: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": str(self.tag_dir), "step": self.step, "family": self.family.name,
                "tokenizer": self.tokenizer, "store_fingerprint": self.store_fingerprint,
                "zero_stage": self.zero_stage}


# ----------------------------------------------------------------------------- locating


def resolve_checkpoint(path: str | Path) -> Path:
    """The committed tag directory that ``path`` names (see the module docstring).

    Raises CheckpointError (naming the path) when there is no such directory, the tag was never
    committed (an interrupted save), or a run has no committed checkpoint yet.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if ckpt.step_of_tag(p.name) is not None:
        if not (p / ckpt.MARKER).is_file():
            raise CheckpointError(f"{p}: checkpoint is not committed (no {ckpt.MARKER} marker: the "
                             "save was interrupted); use an earlier tag")
        return p
    roots = [p, ckpt.root_of_run(p)]  # a checkpoint root itself, or a run directory
    for root in roots:
        latest = ckpt.latest_committed(root)
        if latest is not None:
            return root / latest[1]
    raise CheckpointError(f"{p}: no committed checkpoint (looked in {p} and {roots[1]})")


def _model_states_file(tag_dir: Path) -> Path:
    """Rank 0's model-states file: it holds the client state at every ZeRO stage."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir}: no DeepSpeed model-states file (mp_rank_00_model_states.pt); "
                     "not a zeroforge checkpoint?")


# ----------------------------------------------------------------------------- reading


def _tokenizer_of(client: dict[str, Any]) -> str | None:
    """The tokenizer the weights were trained with: client state, else the run's token store."""
    if client.get("tokenizer"):
        return str(client["tokenizer"])
    data = (client.get("run_config") or {}).get("data") or {}
    paths = [data.get("store")] if data.get("store") else \
        [e.get("store") for e in data.get("mixture") or [] if isinstance(e, dict)]
    for store in paths:
        if store and ("://" in store or Path(store).exists()):
            try:
                return TokenStore.open(store).tokenizer
            except StoreError as e:
                log.warning("cannot read the tokenizer from %s: %s", store, e)
    return None


def _family_of(client: dict[str, Any], model_config: dict[str, Any]) -> registry.Family:
    """The family the run config names; for checkpoints whose run config lacks it, the family
    whose config class has exactly the saved fields."""
    name = ((client.get("run_config") or {}).get("model") or {}).get("family")
    if name in registry.FAMILIES:
        return registry.FAMILIES[name]
    family = registry.family_with_fields(model_config)
    if family is not None:
        return family
    raise ConfigError(f"the checkpoint's model config fits no model family: {sorted(model_config)}")


def _zero_stage(states: dict[str, Any], tag_dir: Path) -> int:
    stage = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    if isinstance(stage, int):
        return stage
    return 1 if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")) else 0


def _consolidate(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from the ZeRO 1-3 partitions of all ranks (CPU, this process only)."""
    chatter = io.StringIO()
    # zero_to_fp32 reports progress with print() and tqdm bars; keep stdout clean for --json
    # consumers and stderr for our own messages (its errors still raise).
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent),
                                                             tag=tag_dir.name)
    except Exception as e:  # noqa: BLE001 -- whatever DeepSpeed's reader trips over
        raise CheckpointError(f"{tag_dir}: the ZeRO shards cannot be merged "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    log.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    return dict(state)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def read_checkpoint(path: str | Path, weights: bool = True
                    ) -> tuple[CheckpointInfo, dict[str, torch.Tensor] | None]:
    """(info, fp32 state dict of the model) of the committed checkpoint ``path`` names.

    ``weights=False`` skips the consolidation and returns ``None`` for the state dict.
    """
    tag_dir = resolve_checkpoint(path)
    states_file = _model_states_file(tag_dir)
    # Nothing is read before its bytes are checked: all files, or the one read here.
    problems = ckpt.verify_tag(tag_dir, None if weights else [states_file.name])
    if problems:
        raise ckpt.CorruptCheckpointError(ckpt.corrupt_message(tag_dir, problems))
    marker = ckpt.read_marker(tag_dir.parent, tag_dir.name)
    try:
        # Tensors, containers and plain values only: no unpickling needed (docs/training.md).
        states = torch.load(states_file, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{states_file}: cannot be read ({_first_line(e)})") from None
    model_dict = states.get("model_config") or marker.get("model_config")
    if not isinstance(model_dict, dict):
        raise CheckpointError(f"{tag_dir}: the checkpoint records no model config")
    family = _family_of(states, model_dict)
    info = CheckpointInfo(
        tag_dir=tag_dir, step=int(states.get("step", marker.get("step", 0))), family=family,
        model_config=family.config_cls.from_dict(model_dict), tokenizer=_tokenizer_of(states),
        store_fingerprint=states.get("store_fingerprint") or marker.get("store_fingerprint"),
        zero_stage=_zero_stage(states, tag_dir), run_config=states.get("run_config") or {},
        tracking_run_id=states.get("tracking_run_id"),
        data_order=(states.get("data") or {}).get("order") or {})
    if not weights:
        return info, None
    if info.zero_stage >= 1:
        state = _consolidate(tag_dir)
    else:
        state = _stage0_weights(states, info)
    return info, state


def _stage0_weights(states: dict[str, Any], info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a stage-0 checkpoint (see the module docstring)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    optimizer = states.get("optimizer") or {}
    if "fp32_groups_flat" in optimizer:  # FP16_Optimizer (DeepSpeed's FusedAdam)
        masters = list(optimizer["fp32_groups_flat"])
    elif "fp32_groups" in optimizer:  # FP16_UnfusedOptimizer (torch's AdamW): one per param
        masters = [torch.cat([t.reshape(-1) for t in group]) for group in optimizer["fp32_groups"]]
    else:  # fp32 training: the module holds the weights the optimizer updates
        return state
    with torch.device("meta"):  # only the parameters' order and shapes are needed
        model = info.family.build(info.model_config)
    groups = [g["params"] for g in param_groups(model, weight_decay=0.0)]
    sizes = [sum(p.numel() for p in g) for g in groups]
    if sizes != [flat.numel() for flat in masters]:
        raise CheckpointError(f"{info.tag_dir}: the optimizer's fp32 master weights "
                              f"({[flat.numel() for flat in masters]} values per group) do not "
                              f"fit the model ({sizes})")
    master_of: dict[int, torch.Tensor] = {}
    for params, flat in zip(groups, masters, strict=True):
        for p, value in zip(params, flat.float().split([p.numel() for p in params]),
                            strict=True):
            master_of[id(p)] = value.view(p.shape)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in master_of:  # tied parameters appear under each of their names
            state[name] = master_of[id(tensor)].clone()
    return state


def load_model(path: str | Path, device: str = "cpu"
               ) -> tuple[torch.nn.Module, CheckpointInfo]:
    """The checkpoint's model with its fp32 weights, in eval mode, on ``device``."""
    info, state = read_checkpoint(path)
    assert state is not None
    model = info.family.build(info.model_config)
    _load_strict(model, state, str(info.tag_dir))
    return model.to(device).eval(), info


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{where}: weights do not fit the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shape {shapes[:5]})")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- init_from


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / ckpt.MARKER).is_file()


def pretrained_weights(source: str | Path
                       ) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    """(model config, fp32 state dict, tokenizer or None) of a checkpoint or HF directory."""
    p = Path(source)
    if p.is_dir() and is_hf_dir(p):
        hf = json.loads((p / "config.json").read_text())
        model = registry.family_of_hf(hf.get("model_type"), str(p)).load_hf(p)
        tokenizer = None
        if (p / EXPORT_SOURCE).is_file():
            tokenizer = json.loads((p / EXPORT_SOURCE).read_text()).get("tokenizer")
        return model.config, {k: v.float() for k, v in model.state_dict().items()}, tokenizer
    info, state = read_checkpoint(p)
    assert state is not None
    return info.model_config, state, info.tokenizer


def _fit_vocab_rows(value: torch.Tensor, want: torch.Size, meaningful: int
                    ) -> torch.Tensor | None:
    """A vocabulary table re-padded to ``want`` rows (only the padding differs), else None."""
    if value.dim() != 2 or value.shape[1:] != want[1:] or min(value.shape[0], want[0]) < meaningful:
        return None
    out = value.new_zeros(want)
    out[:meaningful] = value[:meaningful]
    return out


def init_from(model: torch.nn.Module, source: str | Path, store_tokenizer: str) -> str:
    """Copy the weights of ``source`` (checkpoint or HF directory) into ``model`` before training.

    The architecture must match (fields that change no shape, such as dropout, may differ;
    vocabulary padding is re-done), and so must the tokenizer when the source records one.
    Raises ConfigError naming ``init_from``; returns a one-line description for the log.
    """
    try:
        src_config, state, tokenizer = pretrained_weights(source)
    except ckpt.CorruptCheckpointError as e:  # the source is damaged, not the config
        raise ckpt.CorruptCheckpointError(f"init_from: {e}") from None
    except ValueError as e:  # CheckpointError, or a HF directory that does not fit
        raise ConfigError(f"init_from: {e}") from None
    ours = model.config.to_dict()  # type: ignore[union-attr]
    theirs = src_config.to_dict()
    # Fields that leave the weights alone may differ, and vocabulary padding is re-done below.
    free = type(src_config).WEIGHT_NEUTRAL | {"pad_vocab_to_multiple"}
    problems = []
    if type(src_config) is not type(model.config):
        problems.append(f"{source} holds a {type(src_config).__name__} model, the run "
                        f"trains a {type(model.config).__name__}")
    else:
        problems += [f"model.{k}: {theirs.get(k)!r} in {source}, {ours.get(k)!r} here"
                     for k in sorted(set(ours) | set(theirs))
                     if k not in free and ours.get(k) != theirs.get(k)]
    if tokenizer is not None and tokenizer != store_tokenizer:
        problems.append(f"{source} was trained with tokenizer {tokenizer!r}, the token store "
                        f"uses {store_tokenizer!r}")
    if problems:
        raise ConfigError("init_from: the weights do not fit this run: " + "; ".join(problems))
    own = model.state_dict()
    meaningful = model.config.total_vocab_size  # type: ignore[union-attr]
    for k, v in list(state.items()):
        if k in own and own[k].shape != v.shape:
            fitted = _fit_vocab_rows(v, own[k].shape, meaningful)
            if fitted is not None:
                state[k] = fitted
    # load_state_dict copies into the existing tensors, so tied embeddings stay tied.
    try:
        _load_strict(model, state, f"init_from: {source}")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return f"weights from {source} (tokenizer {tokenizer or 'not recorded'})"
