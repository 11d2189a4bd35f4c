"""Conversion between zeroforge models and HF ``transformers`` checkpoint directories.

Only safetensors/JSON are written; ``transformers`` itself is not needed to export or import
(tests use it to check parity). Exported vocabularies are unpadded
(``vocab_size + n_sentinels`` rows). Our full config is stored next to HF's ``config.json`` in
``zeroforge_config.json`` so a round trip restores padding and the sentinel layout exactly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import EncDecConfig, GPT2Config
from .encdec import EncoderDecoder
from .gpt2 import GPT2

logger = logging.getLogger(__name__)

ZF_CONFIG = "zeroforge_config.json"
# HF GPT-2 uses Conv1D (weight stored as (in, out)); nn.Linear stores (out, in).
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                "mlp.c_proj.weight")


# ---------------------------------------------------------------------------- file helpers
def _write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
           hf_config: dict[str, Any], zf_config: dict[str, Any], kind: str) -> None:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    (out / ZF_CONFIG).write_text(json.dumps({"model": kind, "config": zf_config}, indent=2) + "\n")
    logger.info("wrote HF %s checkpoint to %s", kind, out)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Load weights from model.safetensors, a sharded safetensors index or pytorch_model.bin."""
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"no model.safetensors / pytorch_model.bin found in {path}")


def _read_configs(path: Path, kind: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    hf = json.loads((path / "config.json").read_text())
    zf = None
    if (path / ZF_CONFIG).exists():
        meta = json.loads((path / ZF_CONFIG).read_text())
        if meta.get("model") == kind:
            zf = meta["config"]
    return hf, zf


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing={missing[:8]} unexpected={unexpected[:8]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: model {tuple(own[k].shape)} vs "
                             f"checkpoint {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows so an unpadded (exported) table fills our padded embedding."""
    if w.size(0) == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.size(0), *w.shape[1:])], dim=0)


# ---------------------------------------------------------------------------- GPT-2
def gpt2_to_hf_state(model: GPT2) -> dict[str, torch.Tensor]:
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte; HF re-ties on load
        if k == "transformer.wte.weight":
            v = v[: cfg.total_vocab_size]  # drop vocabulary padding
        if k.endswith(_GPT2_CONV1D):
            v = v.t()  # (out, in) -> Conv1D (in, out)
        out[k] = v
    if not cfg.bias:
        # HF GPT-2 always has biases; zeros are exactly equivalent to having none.
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("ln_" in name or name.endswith(_GPT2_CONV1D)):
                bias_name = name[: -len("weight")] + "bias"
                n = p.shape[0]  # Linear (out, in) and LayerNorm (n,) both start with out dim
                out[bias_name] = p.new_zeros(n)
    return out


def gpt2_hf_config(cfg: GPT2Config) -> dict[str, Any]:
    eos = cfg.eos_token_id
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.total_vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def save_gpt2_hf(model: GPT2, path: str | os.PathLike[str]) -> None:
    _write(path, gpt2_to_hf_state(model), gpt2_hf_config(model.config), model.config.to_dict(),
           "gpt2")


def load_gpt2_hf(path: str | os.PathLike[str], **overrides: Any) -> GPT2:
    """Build a GPT2 from a HF directory. ``overrides`` replace config fields (e.g.
    ``pad_vocab_to_multiple=128``, ``dropout``)."""
    p = Path(path)
    hf, zf = _read_configs(p, "gpt2")
    problems = []
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        problems.append(f"n_inner={hf['n_inner']} (only 4*n_embd is supported)")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={hf['activation_function']}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            problems.append(f"{flag}=True")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if problems:
        raise ValueError("unsupported HF GPT-2 config: " + "; ".join(problems))
    if zf is not None:
        cfg_dict = dict(zf)
    else:
        eos = hf.get("eos_token_id")
        cfg_dict = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                        vocab_size=hf["vocab_size"], n_positions=hf["n_positions"],
                        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                        eos_token_id=eos if isinstance(eos, int) else None)
    cfg_dict.update(overrides)
    cfg = GPT2Config.from_dict(cfg_dict)
    if cfg.total_vocab_size != hf["vocab_size"]:
        raise ValueError(f"vocab_size + n_sentinels ({cfg.total_vocab_size}) must equal the "
                         f"checkpoint vocab_size ({hf['vocab_size']})")

    raw = _read_state(p)
    state: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints / tied head
        if k.endswith(_GPT2_CONV1D):
            v = v.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        if not cfg.bias and k.endswith("bias"):
            if torch.count_nonzero(v):
                raise ValueError(f"bias=False but checkpoint has a non-zero {k}")
            continue
        state["transformer." + k] = v
    state["transformer.wte.weight"] = _pad_rows(state["transformer.wte.weight"],
                                                cfg.padded_vocab_size)
    with torch.device("meta"):
        model = GPT2(cfg)
    model = model.to_empty(device="cpu")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    _load_into(model, state)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty/load keep the tie; be sure
    return model


# ---------------------------------------------------------------------------- T5
def _encdec_name_map(cfg: EncDecConfig) -> dict[str, str]:
    """Our parameter name -> HF T5 parameter name."""
    m = {"shared.weight": "shared.weight",
         "encoder.ln_f.weight": "encoder.final_layer_norm.weight",
         "decoder.ln_f.weight": "decoder.final_layer_norm.weight",
         "encoder.rel_bias.relative_attention_bias.weight":
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "decoder.rel_bias.relative_attention_bias.weight":
             "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        ours, hf = f"encoder.blocks.{i}.", f"encoder.block.{i}.layer."
        for w in "qkvo":
            m[f"{ours}attn.{w}.weight"] = f"{hf}0.SelfAttention.{w}.weight"
        m[f"{ours}ln_1.weight"] = f"{hf}0.layer_norm.weight"
        for w in ("wi_0", "wi_1", "wo"):
            m[f"{ours}mlp.{w}.weight"] = f"{hf}1.DenseReluDense.{w}.weight"
        m[f"{ours}ln_2.weight"] = f"{hf}1.layer_norm.weight"
    assert cfg.num_decoder_layers is not None
    for i in range(cfg.num_decoder_layers):
        ours, hf = f"decoder.blocks.{i}.", f"decoder.block.{i}.layer."
        for w in "qkvo":
            m[f"{ours}attn.{w}.weight"] = f"{hf}0.SelfAttention.{w}.weight"
            m[f"{ours}cross_attn.{w}.weight"] = f"{hf}1.EncDecAttention.{w}.weight"
        m[f"{ours}ln_1.weight"] = f"{hf}0.layer_norm.weight"
        m[f"{ours}ln_cross.weight"] = f"{hf}1.layer_norm.weight"
        for w in ("wi_0", "wi_1", "wo"):
            m[f"{ours}mlp.{w}.weight"] = f"{hf}2.DenseReluDense.{w}.weight"
        m[f"{ours}ln_2.weight"] = f"{hf}2.layer_norm.weight"
    return m


def encdec_hf_config(cfg: EncDecConfig) -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.total_vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True,
        # Untied (v1.1): HF >= 5 reads this to disable output scaling and keeps lm_head
        # separate because both tensors are in the checkpoint.
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "torch_dtype": "float32",
    }


def save_encdec_hf(model: EncoderDecoder, path: str | os.PathLike[str]) -> None:
    cfg = model.config
    own = model.state_dict()
    out = {}
    for ours, hf in _encdec_name_map(cfg).items():
        v = own[ours]
        if ours in ("shared.weight", "lm_head.weight"):
            v = v[: cfg.total_vocab_size]  # drop vocabulary padding
        out[hf] = v
    _write(path, out, encdec_hf_config(cfg), cfg.to_dict(), "encdec")


def load_encdec_hf(path: str | os.PathLike[str], **overrides: Any) -> EncoderDecoder:
    """Build an EncoderDecoder from a HF T5 directory. Without our ``zeroforge_config.json``
    the whole HF vocabulary is treated as tokenizer vocabulary (``n_sentinels=0``) unless
    ``overrides`` say otherwise (e.g. ``vocab_size=32000, n_sentinels=100`` for google T5,
    whose sentinels then do *not* follow our id scheme)."""
    p = Path(path)
    hf, zf = _read_configs(p, "encdec")
    raw = _read_state(p)
    ff = hf.get("feed_forward_proj", "relu")
    if ff != "gated-gelu":
        raise ValueError(f"unsupported HF T5 feed_forward_proj={ff!r} (need 'gated-gelu')")
    # HF: output scaling follows scale_decoder_outputs, else the legacy tie flag (default True).
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    head_in_ckpt = "lm_head.weight" in raw
    if scale and head_in_ckpt and not torch.equal(raw["lm_head.weight"], raw["shared.weight"]):
        raise ValueError("checkpoint scales decoder outputs but has an untied lm_head; "
                         "unsupported combination")
    tied = bool(scale)
    if zf is not None:
        cfg_dict = dict(zf)
    else:
        cfg_dict = dict(
            d_model=hf["d_model"], d_ff=hf["d_ff"], d_kv=hf["d_kv"], num_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            num_heads=hf["num_heads"], vocab_size=hf["vocab_size"], n_sentinels=0,
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            pad_token_id=hf.get("pad_token_id") or 0,
            eos_token_id=hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int)
            else None,
            decoder_start_token_id=hf.get("decoder_start_token_id"),
        )
    cfg_dict["tie_word_embeddings"] = tied
    cfg_dict.update(overrides)
    cfg = EncDecConfig.from_dict(cfg_dict)
    if cfg.total_vocab_size != hf["vocab_size"]:
        raise ValueError(f"vocab_size + n_sentinels ({cfg.total_vocab_size}) must equal the "
                         f"checkpoint vocab_size ({hf['vocab_size']})")
    if "encoder.embed_tokens.weight" in raw and "shared.weight" not in raw:
        raw["shared.weight"] = raw["encoder.embed_tokens.weight"]
    if not cfg.tie_word_embeddings and not head_in_ckpt:
        # HF >= 5 ties the head when only `shared` was saved (no scaling): copy it.
        raw["lm_head.weight"] = raw["shared.weight"]
    state = {}
    for ours, hf_name in _encdec_name_map(cfg).items():
        if hf_name not in raw:
            raise ValueError(f"checkpoint is missing {hf_name}")
        v = raw[hf_name]
        if ours in ("shared.weight", "lm_head.weight"):
            v = _pad_rows(v, cfg.padded_vocab_size)
        state[ours] = v
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["shared.weight"]
    _load_into(model, state)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    return model
