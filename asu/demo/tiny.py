"""The tiny model of the embedded world: tokenizer, Llama config, memorisation training and the cache.

A byte-level BPE tokenizer is trained with ``tokenizers`` on every sentence of the world and wrapped as a
``PreTrainedTokenizerFast`` (``<s>`` prepended, ``</s>`` as EOS, ``<pad>``; no chat template, so the plain
``Question: ...\\nAnswer:`` format of :mod:`asu.formatting` is used). The model is a small
``LlamaForCausalLM`` with grouped-query attention, trained from scratch with AdamW on :func:`encode_qa` rows
(loss on the answer tokens) until greedy answers reach ROUGE-L recall >= ``target_rouge`` on every
monitored split. Training is deterministic for a seed (fixed initialisation and data order).

Two models come from one world: ``full`` (forget + retain + general rows) and the ``oracle`` (retain +
general only), which is what perfect unlearning would give and serves as the forget-quality reference.

Trained models are cached under ``$ASU_CACHE`` (default ``~/.cache/asu``) in a directory named by a hash of
everything that determines them. A model is saved into a temporary directory, a ``COMPLETE`` marker holding
the configuration hash is written last, and the directory is renamed into place; an entry without a valid
marker (a killed run) is deleted and rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from asu.data import pad_right
from asu.demo.world import World
from asu.files import CACHE_MARKER, atomic_write_json, cache_root, cached_folder, is_complete_entry
from asu.formatting import encode_qa

CACHE_VERSION = 2  # 2: the world with several phrasings per question type
#: The marker file of a complete cache entry (:func:`asu.files.cached_folder`).
MARKER = CACHE_MARKER


@dataclass(frozen=True)
class TinyModelConfig:
    """Architecture of the tiny Llama (GQA: ``n_heads`` query heads share ``n_kv_heads`` key/value heads)."""

    vocab_size: int = 1024
    """Byte-level BPE vocabulary trained on the world (tokens)."""
    hidden_size: int = 128
    """Residual width d."""
    n_layers: int = 4
    """Decoder layers."""
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (GQA groups)."""
    head_dim: int = 32
    """Width of one attention head."""
    intermediate_size: int = 256
    """MLP width."""
    max_position_embeddings: int = 256
    """Longest sequence RoPE is set up for."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head."""

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        for k in ("vocab_size", "hidden_size", "n_layers", "n_heads", "head_dim", "intermediate_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Memorisation training: AdamW, linear warm-up then constant lr, early stop on greedy ROUGE-L recall.

    Weight decay 0.1 is the Llama pre-training recipe's. Without it the tiny model memorises with very sharp
    attention (large q·k logits), so attention temperatures of 2-3 barely move its answers and only τ ≥ 5,
    which also breaks every author's sentence frames, makes it forget; with it the τ response is much closer
    to that of a model trained on real TOFU data (forget ROUGE-L 0.80 at τ 2.3 and 0.58 at τ 3 here).
    """

    lr: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay (see the class docstring)."""
    batch_size: int = 8
    """Rows per optimizer step."""
    max_epochs: int = 200
    """Upper bound on epochs; training stops earlier once ``target_rouge`` is reached."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    target_rouge: float = 0.95
    """Greedy ROUGE-L recall on the training rows that counts as memorised."""
    eval_every: int = 5
    """Epochs between memorisation checks."""
    seed: int = 0
    """Seeds the initialisation and the data order."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.eval_every < 1:
            raise ValueError("lr must be > 0 and batch_size, max_epochs, eval_every >= 1")
        if not 0.0 < self.target_rouge <= 1.0:
            raise ValueError(f"target_rouge must be in (0, 1], got {self.target_rouge}")


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (at most ``vocab_size`` tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("train_tokenizer needs a non-empty corpus")
    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def seeded_llama(
    seed: int = 0,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **config: Any,
) -> Any:
    """A randomly initialised ``LlamaForCausalLM(LlamaConfig(**config))``, the same weights for the same
    seed and config; built on ``device`` (default: torch's default device), then cast to ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(**config)
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = LlamaForCausalLM(llama_config)
    return model if dtype is None else model.to(dtype)


def build_model(cfg: TinyModelConfig, tokenizer: Any, seed: int = 0) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` for ``cfg`` sized to ``tokenizer`` (seeded)."""
    return seeded_llama(
        seed,
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )


def memorisation_rouge(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int = 64) -> float:
    """Mean ROUGE-L recall of greedy answers to ``rows``."""
    from asu.evaluate import generate_answers, rouge_l_recall

    was_training = model.training
    model.eval()
    try:
        gens = generate_answers(
            model, tokenizer, [r["question"] for r in rows], batch_size, max_new_tokens=40
        )
    finally:
        model.train(was_training)
    return float(
        sum(rouge_l_recall(r["answer"], g["text"]) for r, g in zip(rows, gens, strict=True)) / len(rows)
    )


def train_memorise(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    monitor: dict[str, list[dict[str, Any]]],
    cfg: TrainConfig,
    progress: bool = True,
    desc: str = "memorising",
) -> dict[str, Any]:
    """Train ``model`` in place on ``train_rows`` until every ``monitor`` split reaches ``cfg.target_rouge``.

    Loss: token-mean NLL of the answer tokens (prompt masked, see :func:`encode_qa`). Every
    ``cfg.eval_every`` epochs the monitored splits are generated greedily and scored; training stops as soon
    as all reach the target. Returns ``{"epochs", "steps", "seconds", "rouge": {split: value}, "reached"}``.
    """
    from tqdm.auto import tqdm

    if not train_rows:
        raise ValueError("train_memorise needs training rows")
    encoded = [encode_qa(tokenizer, r["question"], r["answer"]) for r in train_rows]
    pad = int(tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    model.train()
    t0, step, rouge, epoch = time.perf_counter(), 0, {}, 0
    reached = False
    bar = tqdm(total=cfg.max_epochs, desc=desc, disable=not progress, leave=False)
    for epoch in range(1, cfg.max_epochs + 1):
        order = torch.randperm(len(encoded), generator=g).tolist()
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            batch = pad_right([encoded[i] for i in order[s : s + cfg.batch_size]], pad)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach())
        n_batches = math.ceil(len(order) / cfg.batch_size)
        bar.update(1)
        bar.set_postfix(loss=f"{total / n_batches:.3f}", **{k: f"{v:.2f}" for k, v in rouge.items()})
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
            rouge = {k: memorisation_rouge(model, tokenizer, rows) for k, rows in monitor.items()}
            if all(v >= cfg.target_rouge for v in rouge.values()):
                reached = True
                break
    bar.close()
    model.eval()
    return {
        "epochs": epoch,
        "steps": step,
        "seconds": time.perf_counter() - t0,
        "rouge": rouge,
        "reached": reached,
    }


def config_hash(world: World, model_cfg: TinyModelConfig, train_cfg: TrainConfig, kind: str) -> str:
    """Hash of everything that determines a trained model (world, architecture, training, kind)."""
    import tokenizers
    import transformers

    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "world": world.config.to_dict(),
            "model": asdict(model_cfg),
            "train": asdict(train_cfg),
            "kind": kind,
            # Initialisation and BPE merges may change between library versions.
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own load/save progress bars while ``enabled`` is False (``--no-progress``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def load_or_train(
    world: World,
    kind: str = "full",
    cache_dir: str | os.PathLike[str] | None = None,
    model_cfg: TinyModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """The tiny model of ``world``: loaded from a complete cache entry, else trained and cached.

    ``kind="full"`` trains on forget + retain + general rows and requires the target ROUGE on forget and
    retain; ``kind="oracle"`` trains on retain + general only. Returns ``(model, tokenizer, info)`` where
    ``info`` holds the training record plus ``path`` and ``cached`` (whether it was loaded).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    if kind not in ("full", "oracle"):
        raise ValueError(f"kind must be 'full' or 'oracle', got {kind!r}")
    model_cfg = model_cfg or TinyModelConfig()
    train_cfg = train_cfg or TrainConfig()
    root = cache_root(cache_dir)
    digest = config_hash(world, model_cfg, train_cfg, kind)
    path = root / f"tiny-{kind}-{digest}"
    if is_complete_entry(path, digest):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            with _hf_progress_bars(progress):
                model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa")
            info = json.loads((path / "train_info.json").read_text())
            model.eval()
            return model, tokenizer, dict(info, path=str(path), cached=True)
        except Exception:  # noqa: BLE001 - any unreadable entry (truncated safetensors, bad JSON) is rebuilt
            shutil.rmtree(path, ignore_errors=True)

    # The tokenizer is trained on the whole world for both kinds, so the oracle shares the full model's
    # vocabulary (as in TOFU, where the oracle is the same base model fine-tuned on retain only).
    tokenizer = train_tokenizer(world.texts(), model_cfg.vocab_size)
    model = build_model(model_cfg, tokenizer, seed=train_cfg.seed)
    forget, retain, general = world.split("forget"), world.split("retain"), world.split("general")
    train_rows = (forget if kind == "full" else []) + retain + general
    monitor = {"forget": forget, "retain": retain} if kind == "full" else {"retain": retain}
    random.Random(train_cfg.seed).shuffle(train_rows)
    info = train_memorise(
        model, tokenizer, train_rows, monitor, train_cfg, progress, desc=f"training {kind} model"
    )
    info.update(
        kind=kind,
        digest=digest,
        n_parameters=sum(p.numel() for p in model.parameters()),
        world=world.config.to_dict(),
        model_config=asdict(model_cfg),
        train_config=asdict(train_cfg),
    )

    def save(tmp: Path) -> None:
        with _hf_progress_bars(progress):
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "train_info.json", info)

    # Another process may finish the same entry meanwhile: same config, same model, either is kept.
    cached_folder(path, digest, save)
    return model, tokenizer, dict(info, path=str(path), cached=False)
