"""Downstream evaluation through EleutherAI's lm-evaluation-harness (the optional ``eval`` extra).

``ZeroforgeLM`` implements the harness's ``LM`` interface over our models:

- ``loglikelihood``: (context, continuation) pairs, tokenized as the harness does for the
  family's form (registry ``Family.lm``: ``causal`` or ``seq2seq``), sorted longest first and
  batched ``batch_size`` at a time; the family's ``score`` runs the LM head only at the scored
  positions (model/score.py);
- ``loglikelihood_rolling``: a document's disjoint windows of ``max_length`` tokens (the
  harness's own window functions), all of a call's windows sorted and batched together;
- ``generate_until``: batches of prompts of equal generation settings through the family's
  KV-cache generation, each sequence ending at EOS or at the first stop string.

The tokenization, truncation and stop rules are the Hugging Face backend's
(``lm_eval --model hf``), so on an exported checkpoint both give the same numbers
(tests/e2e/test_harness.py; for an encoder-decoder that backend has two faults of its own,
docs/evaluation.md says which and how the test works around them).

Several ranks share the work through the harness's own data-parallel path: each rank takes
every world-th document of each task, runs it on its own full copy of the model, and rank 0
gathers the per-document metrics (``rank``/``world_size``/``all_gather``/``gather_object``/
``barrier`` below) and alone gets the results.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tiktoken
import torch
import torch.distributed as dist
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.tasks import TaskManager
from lm_eval.utils import (
    get_rolling_token_windows,
    handle_non_serializable,
    make_disjoint_window,
    make_table,
)
from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.model import Sampling
from zeroforge.pipeline.dist import discover
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.registry import Family
from zeroforge.pipeline.results.weights import load_model
from zeroforge.pipeline.training.process import init_distributed

log = logging.getLogger("zeroforge.harness")

# Generation settings a task may ask for that ``Sampling`` has; any other is refused.
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}
# The harness's default number of generated tokens (its Hugging Face backend's too).
MAX_GEN_TOKS = 256


class ZeroforgeLM(TemplateLM):
    """lm-evaluation-harness's LM interface over a zeroforge model (see the module docstring).

    ``model`` is a plain module (GPT2, EncoderDecoder), in eval mode on its device; ``distributed``
    shares the documents among the ranks of the initialized process group.
    """

    def __init__(self, model: torch.nn.Module, family: Family, encoding: tiktoken.Encoding,
                 batch_size: int = 16, max_length: int | None = None,
                 distributed: bool = False, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.info = dict(info or {})  # what the result's "config" says about the model
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        self.model, self.family, self.enc = model, family, encoding
        self.backend = family.lm.backend  # read by the harness's pair tokenization
        self._max_length = max_length or family.lm.max_length(model.config)
        self._batch_size = batch_size
        self._device = next(model.parameters()).device
        if distributed and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # ------------------------------------------------------------------ what the harness asks
    @property
    def eot_token_id(self) -> int:
        return self.enc.eot_token

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.enc.name

    def get_model_info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"model": "zeroforge", "family": self.family.name, "model_num_parameters": n_params,
                "tokenizer": self.enc.name, "max_length": self.max_length, **self.info}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
                   ) -> list[int]:
        # Special-token text (<|endoftext|>) becomes the special token, as a Hugging Face
        # tokenizer does; GPT-2's tokenizer adds no BOS/EOS, so ``add_special_tokens`` is moot.
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text of ordinary tokens; EOT and sentinels are left out (``skip_special_tokens``)."""
        eot, n_vocab = self.eot_token_id, self.enc.n_vocab
        return self.enc.decode([t for t in tokens if t < n_vocab and t != eot])

    # ------------------------------------------------------------------ distributed
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        # Longest first: a batch is as long as its first request, and memory peaks at once.
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        answers: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=self.batch_size):
            pairs = [(ctx, cont) for _, ctx, cont in chunk]
            for (key, _, _), answer in zip(chunk, self.family.lm.score(self.model, pairs,
                                                                         self.max_length),
                                           strict=True):
                answers.append(answer)
                if key is not None:  # rolling windows are cached per document instead
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return order.get_original(answers)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (text,) in enumerate(r.args for r in requests):
            rolling = get_rolling_token_windows(token_list=self.tok_encode(text),
                                                prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, rolling):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        order = Collator([r.args for r in requests],
                         sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos = self.enc.decode([self.eot_token_id])
        out: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, settings = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(settings[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            texts = self._generate(list(contexts), until, max_gen, kwargs)
            for context, text in zip(contexts, texts, strict=True):
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, settings[0]), text)
        return order.get_original(out)

    def _generate(self, contexts: list[str], until: list[str], max_gen: int,
                  kwargs: dict[str, Any]) -> list[str]:
        unknown = sorted(set(kwargs) - _SAMPLING_KEYS)
        if unknown:
            raise ConfigError(f"task generation_kwargs {unknown} are not supported (zeroforge "
                              f"generates with {sorted(_SAMPLING_KEYS)}, until, max_gen_toks)")
        budget = self.max_length - max_gen if self.family.lm.generation_shares_window \
            else self.max_length
        if budget < 1:
            raise ConfigError(f"task max_gen_toks {max_gen} leaves no room for the context in "
                              f"the model's {self.max_length} positions")
        # An empty context starts from EOT, a document boundary (the harness's prefix token).
        prompts = [self.tok_encode(c)[-budget:] or [self.prefix_token_id] for c in contexts]
        stops = [s for s in until if s]

        def stopped(tokens: list[int]) -> bool:
            text = self.tok_decode(tokens)
            return any(s in text for s in stops)

        sampling = Sampling(do_sample=bool(kwargs.get("do_sample", False)),
                            temperature=float(kwargs.get("temperature", 1.0)),
                            top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                            stop=stopped if stops else None)
        outputs = self.family.generate(self.model, prompts, max_gen, sampling)
        return [postprocess_generated_text(self.tok_decode(o), until, None) for o in outputs]


# ---------------------------------------------------------------------------------- tasks


def task_manager(include_path: str | None = None) -> TaskManager:
    """The harness's task index (its ~15k shipped tasks, ~7 s), plus the YAML tasks under
    ``include_path``."""
    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_tasks(names: Sequence[str], manager: TaskManager, where: str) -> None:
    """Refuse unknown task names and tasks whose data cannot be loaded (a download that fails
    offline), as one line naming ``where`` (the flag or config key) and the task."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: no lm-evaluation-harness task {name!r}{hint}; local "
                              "tasks need their YAML folder passed as the include path")
    for name in names:
        try:
            manager.load([name])
        except Exception as e:  # datasets/hub errors of every kind: report, do not trace
            raise ConfigError(f"{where}: task {name!r}: its data cannot be loaded "
                              f"({type(e).__name__}: {_first_line(e)}); tasks on the Hugging "
                              "Face Hub need a download (or a filled datasets cache)") from None


def evaluate(lm: ZeroforgeLM, tasks: Sequence[str], manager: TaskManager,
             num_fewshot: int | None = None, limit: int | None = None) -> dict[str, Any] | None:
    """The harness's result structure (``{"results": {task: {"acc,none": ...}}, ...}``) on
    rank 0; None on the other ranks. Call on every rank of ``lm``."""
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False,
                              bootstrap_iters=100_000)
    return results if lm.rank == 0 else None


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """``harness/<task>/<metric>`` numbers of a result structure: ``acc,none`` is ``acc``,
    another filter is appended (``exact_match.strict-match``); non-numbers are left out."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}.{filt}"
            out[f"harness/{task}/{name}"] = float(value)
    return out


def evaluate_checkpoint(checkpoint: str | Path, tasks: Sequence[str],
                        include_path: str | None = None, num_fewshot: int | None = None,
                        limit: int | None = None, batch_size: int = 16
                        ) -> dict[str, Any] | None:
    """``zeroforge eval --tasks``: the harness's result structure for a committed checkpoint.

    One process loads the fp32 weights directly (results/weights.py: any ZeRO stage). Under a
    multi-rank launcher every rank loads them and the ranks share the documents; rank 0 gets
    the results, the others None.
    """
    d = discover()
    device = init_distributed(d) if d.world_size > 1 else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(checkpoint, device)
    if info.tokenizer is None:
        raise ConfigError(f"{info.tag_dir}: the checkpoint does not record its tokenizer and its "
                          "token store is gone")
    manager = task_manager(include_path)
    check_tasks(tasks, manager, "--tasks")
    lm = ZeroforgeLM(model, info.family, get_encoding(info.tokenizer), batch_size,
                     distributed=True, info=info.to_json())
    return evaluate(lm, tasks, manager, num_fewshot, limit)


def to_json(results: dict[str, Any]) -> str:
    """The result structure as JSON (what ``lm_eval --output_path`` writes)."""
    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def to_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown tables (tasks, then groups if any)."""
    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no message"
