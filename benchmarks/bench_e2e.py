"""End-to-end benchmark: one ASU unlearning epoch, the authors' pipeline shape against ours.

Data (TOFU-shaped, random tokens): ``n`` forget and ``n`` retain QA pairs, ``<bos> question answer <eos>``
with questions of 10-30 tokens and answers of 20-80 tokens; the loss counts the positions predicting
answer tokens and the final EOS. Model: a random-init ``LlamaForCausalLM`` (Llama-3.2-1B shape on CUDA, a
tiny one on CPU).
Both pipelines take the same optimiser steps over the same examples in the same order (``batch`` forget +
``batch`` retain pairs per step, AdamW lr 1e-5, weight decay 0.01), minimising

    L = lam * mean_seq[ (1/T_s) sum_{t in answer} KL(p_teacher(.|x,y<t) || p_student(.|x,y<t)) ] + NLL_retain

with ``lam = 0.1``, teacher = the original model with every attention softmax at ``tau = 2.3``, and the retain
NLL a token mean over the step's retain answers.

* ``authors``: every example padded to 500 tokens, micro-batches with gradient accumulation, a frozen teacher
  copy run forward on every step, eager attention (the teacher's ``scaling`` divided by tau), full logits in
  fp32 and ``F.kl_div`` / ``F.cross_entropy``.
* ``ours``: the asu layer's attention (``attn_implementation="asu"``, imported from :mod:`asu.attention`),
  examples packed into rows with per-document attention (``position_ids`` restarting at 0), the teacher's last
  hidden states at answer positions cached once before the epoch (one smoothed pass of the original model;
  no teacher copy) together with a frozen copy of the LM head, and the fused ``asu_kernels.linear_kl`` /
  ``linear_cross_entropy`` on hidden states, so no logits tensor exists. Smoothing is
  ``asu.smoothing.smoothing``.

* ``asu-unlearn``: the package's entry point ``asu.unlearn.unlearn`` (a transformers Trainer) with
  ``teacher="cache"`` and packing, on the same examples spelled as text for a word-level tokenizer; its data
  order, pairing and schedule are the Trainer's, so only its time and memory are recorded.

Rows: epoch wall time (``s``, the cache pass included for ours), ``tokens/s`` (real, unpadded tokens of the
epoch), peak memory (``GB``), the first-step and last-step losses (metrics ``loss_first`` / ``loss_last``; the
two pipelines compute the same objective, so their first-step losses agree to float error).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import asu.attention  # noqa: F401  (registers attn_implementation "asu")
from asu.data import first_fit
from asu.demo.tiny import seeded_llama
from asu.smoothing import set_smoothing, smoothing
from asu.unlearn import UnlearnConfig, unlearn
from benchmarks.common import Recorder, Unavailable, peak_memory_gb

IGNORE = -100
BOS, EOS, PAD = 1, 2, 0
FIRST_WORD = 6  # ids 3..5 are the words of the plain QA prompt in word_tokenizer()


@dataclass
class E2EConfig:
    """Model shape, data size and optimisation settings of one benchmark epoch."""

    model: dict[str, Any]
    examples: int = 400
    batch: int = 32  # forget (and retain) pairs per optimiser step
    micro_batch: int = 4  # authors' pipeline: padded sequences per forward
    pad_to: int = 500
    pack_tokens: int = 8192  # ours: token budget of one packed row
    question_len: tuple[int, int] = (10, 30)
    answer_len: tuple[int, int] = (20, 80)
    lam: float = 0.1
    temperature: float = 2.3
    lr: float = 1e-5
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    name: str = "llama-1b"
    lora_r: int = 0  # 0 = full fine-tuning; else LoRA (PEFT) of this rank on every projection

    def params(self) -> str:
        m = self.model
        return (
            f"model={self.name};layers={m['num_hidden_layers']};hidden={m['hidden_size']};"
            f"heads={m['num_attention_heads']}/{m['num_key_value_heads']};vocab={m['vocab_size']};"
            f"examples={self.examples};batch={self.batch};micro_batch={self.micro_batch};pad_to={self.pad_to};"
            f"pack_tokens={self.pack_tokens};lam={self.lam};lora_r={self.lora_r}"
        )


def llama_shape(
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int,
    positions: int,
    rope_theta: float,
) -> dict[str, Any]:
    """The ``LlamaConfig`` keyword arguments of a model shape (untied input and output embeddings)."""
    return dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        max_position_embeddings=positions, rope_theta=rope_theta, tie_word_embeddings=False,
    )  # fmt: skip


# Llama-3.2-1B, Llama-3-8B, and a tiny Llama for the CPU.
LLAMA_1B = llama_shape(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64,
                       vocab=128256, positions=131072, rope_theta=500000.0)  # fmt: skip
LLAMA_8B = llama_shape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                       vocab=128256, positions=131072, rope_theta=500000.0)  # fmt: skip
TINY = llama_shape(layers=2, hidden=64, intermediate=172, heads=4, kv_heads=2, head_dim=16,
                   vocab=512, positions=1024, rope_theta=10000.0)  # fmt: skip


MODELS = ("llama-1b", "llama-8b-lora", "tiny", "tiny-lora")


def make_config(
    device: str, *, tiny: bool = False, examples: int | None = None, model: str | None = None
) -> E2EConfig:
    """The epoch's settings. ``model``: ``llama-1b`` (Llama-3.2-1B shape, full fine-tuning; the CUDA
    default), ``llama-8b-lora`` (Llama-3-8B shape, LoRA r=16), ``tiny`` / ``tiny-lora`` (a tiny Llama in
    fp32; the CPU default). ``tiny`` sizes: 8 examples, batch 4."""
    model = model or ("llama-1b" if device.startswith("cuda") else "tiny")
    if model not in MODELS:
        raise ValueError(f"unknown e2e model {model!r}; choose from {', '.join(MODELS)}")
    if model == "llama-1b":
        cfg = E2EConfig(model=dict(LLAMA_1B), name="llama-1b-shape")
    elif model == "llama-8b-lora":
        cfg = E2EConfig(model=dict(LLAMA_8B), name="llama-8b-shape-lora", lora_r=16, micro_batch=2, lr=1e-4)
    else:
        cfg = E2EConfig(
            model=dict(TINY), name=f"{model}-llama", dtype=torch.float32, micro_batch=8, pack_tokens=2048
        )
        cfg.lora_r = 4 if model == "tiny-lora" else 0
    if tiny:
        cfg.examples, cfg.batch, cfg.micro_batch = 8, 4, 2
    if examples is not None:
        cfg.examples = examples
    return cfg


# ----------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    ids: list[int]
    prompt: int  # tokens before the first answer token (bos + question)

    @property
    def answer_tokens(self) -> int:
        return len(self.ids) - self.prompt


def make_data(cfg: E2EConfig) -> tuple[list[Example], list[Example]]:
    """TOFU-shaped forget and retain sets of random tokens (ids FIRST_WORD..V-1; 0/1/2 are pad/bos/eos)."""
    rng = random.Random(cfg.seed)
    vocab = cfg.model["vocab_size"]

    def one() -> Example:
        q = [rng.randrange(FIRST_WORD, vocab) for _ in range(rng.randint(*cfg.question_len))]
        a = [rng.randrange(FIRST_WORD, vocab) for _ in range(rng.randint(*cfg.answer_len))]
        return Example([BOS, *q, *a, EOS], 1 + len(q))

    return [one() for _ in range(cfg.examples)], [one() for _ in range(cfg.examples)]


def steps(cfg: E2EConfig, forget: list[Example], retain: list[Example]) -> Iterator[tuple[list, list]]:
    for s in range(0, len(forget), cfg.batch):
        yield forget[s : s + cfg.batch], retain[s : s + cfg.batch]


def build_model(cfg: E2EConfig, device: str, attn: str) -> torch.nn.Module:
    """The random-init model of ``cfg`` on ``device``, running attention implementation ``attn``."""
    return seeded_llama(
        cfg.seed, device=device, dtype=cfg.dtype, **cfg.model, attn_implementation=attn, bos_token_id=BOS,
        eos_token_id=EOS,
    )  # fmt: skip


def with_lora(model: torch.nn.Module, cfg: E2EConfig) -> torch.nn.Module:
    """The student: ``model`` itself, or wrapped with LoRA adapters (PEFT) when ``cfg.lora_r > 0``."""
    if cfg.lora_r <= 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise Unavailable(f"LoRA needs peft, which is not installed ({e})") from None
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a plain or PEFT-wrapped causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _head(model: torch.nn.Module) -> torch.Tensor:
    return model.get_output_embeddings().weight


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ authors' shape


def _pad(batch: list[Example], width: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and a (B, width) mask of positions predicting answer tokens."""
    ids = torch.full((len(batch), width), PAD, dtype=torch.long)
    attn = torch.zeros(len(batch), width, dtype=torch.long)
    pred = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, ex in enumerate(batch):
        ids[i, : len(ex.ids)] = torch.tensor(ex.ids)
        attn[i, : len(ex.ids)] = 1
        pred[i, ex.prompt - 1 : len(ex.ids) - 1] = True  # position t predicts token t + 1
    return ids.to(device), attn.to(device), pred.to(device)


def authors_epoch(model: torch.nn.Module, cfg: E2EConfig, forget, retain, device: str) -> list[float]:
    """One epoch in the authors' pipeline shape; returns the loss of every optimiser step."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    set_smoothing(teacher, cfg.temperature)  # eager attention: every module's scaling divided by tau
    model = with_lora(model, cfg)
    opt = torch.optim.AdamW(_trainable(model), lr=cfg.lr, weight_decay=0.01)
    losses = []
    for f_batch, r_batch in steps(cfg, forget, retain):
        opt.zero_grad(set_to_none=True)
        n_seq = len(f_batch)
        n_retain = sum(ex.answer_tokens for ex in r_batch)
        total = 0.0
        for s in range(0, n_seq, cfg.micro_batch):
            f_ids, f_attn, f_pred = _pad(f_batch[s : s + cfg.micro_batch], cfg.pad_to, device)
            with torch.no_grad():
                log_p = F.log_softmax(teacher(input_ids=f_ids, attention_mask=f_attn).logits.float(), -1)
            log_q = F.log_softmax(model(input_ids=f_ids, attention_mask=f_attn).logits.float(), -1)
            kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # (b, pad_to)
            per_seq = (kl * f_pred).sum(1) / f_pred.sum(1)
            forget_loss = per_seq.sum() / n_seq
            del log_p, log_q, kl
            r_ids, r_attn, r_pred = _pad(r_batch[s : s + cfg.micro_batch], cfg.pad_to, device)
            logits = model(input_ids=r_ids, attention_mask=r_attn).logits.float()
            targets = torch.where(r_pred[:, :-1], r_ids[:, 1:], IGNORE)
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"
            )
            loss = cfg.lam * forget_loss + nll / n_retain
            loss.backward()
            total += float(loss.detach())
            del logits, loss
        opt.step()
        losses.append(total)
    del teacher
    return losses


# -------------------------------------------------------------------------------------------------- ours


def _pack(examples: list[Example], budget: int) -> list[list[int]]:
    """First-fit packing (as the package's collator) of example indices into rows of ``budget`` tokens."""
    return first_fit([len(ex.ids) for ex in examples], budget)


def _row_tensors(examples: list[Example], members: list[int], device: str):
    """ids and restarting position_ids (1, T) of a packed row; per member, its answer-predicting span."""
    ids, pos, spans, offset = [], [], [], 0
    for i in members:
        ex = examples[i]
        ids += ex.ids
        pos += range(len(ex.ids))
        spans.append((i, offset + ex.prompt - 1, offset + len(ex.ids) - 1))
        offset += len(ex.ids)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)[None]  # noqa: E731
    return as_t(ids), as_t(pos), spans


def _hidden(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Last hidden states (T, d) of a packed row; documents are separated by the position_ids restarts."""
    return _decoder(model)(input_ids=ids, position_ids=pos).last_hidden_state[0]


def teacher_cache(
    model: torch.nn.Module, cfg: E2EConfig, forget: list[Example], device: str
) -> list[torch.Tensor]:
    """One smoothed pass of the original model: hidden states at each example's answer positions."""
    cache: list[torch.Tensor | None] = [None] * len(forget)
    with torch.no_grad(), smoothing(model, cfg.temperature):
        for members in _pack(forget, cfg.pack_tokens):
            ids, pos, spans = _row_tensors(forget, members, device)
            h = _hidden(model, ids, pos)
            for i, a, b in spans:
                cache[i] = h[a:b].clone()
    return cache  # type: ignore[return-value]


def ours_epoch(model: torch.nn.Module, cfg: E2EConfig, forget, retain, device: str) -> list[float]:
    """One epoch with packing, the cached teacher and the fused losses; returns the loss of every step."""
    import asu_kernels

    frozen_head = _head(model).detach().clone()
    cache = teacher_cache(model, cfg, forget, device)  # the original model, before any adapter exists
    model = with_lora(model, cfg)
    opt = torch.optim.AdamW(_trainable(model), lr=cfg.lr, weight_decay=0.01)
    losses = []
    base = 0
    for f_batch, r_batch in steps(cfg, forget, retain):
        opt.zero_grad(set_to_none=True)
        n_seq = len(f_batch)
        n_retain = sum(ex.answer_tokens for ex in r_batch)
        docs = f_batch + r_batch  # one packed pass over the step's forget and retain documents
        total = 0.0
        for members in _pack(docs, cfg.pack_tokens):
            ids, pos, spans = _row_tensors(docs, members, device)
            h = _hidden(model, ids, pos)
            f_rows, t_rows, w, r_rows, r_labels = [], [], [], [], []
            for i, a, b in spans:
                if i < n_seq:
                    f_rows.append(h[a:b])
                    t_rows.append(cache[base + i])
                    w.append(torch.full((b - a,), 1.0 / ((b - a) * n_seq), device=device))
                else:
                    r_rows.append(h[a:b])
                    r_labels.append(ids[0, a + 1 : b + 1])
            loss = h.new_zeros((), dtype=torch.float32)
            weight = _head(model)
            if f_rows:
                kl = asu_kernels.linear_kl(
                    torch.cat(f_rows), weight, torch.cat(t_rows), frozen_head, weights=torch.cat(w)
                )
                loss = loss + cfg.lam * kl.float()
            if r_rows:
                labels = torch.cat(r_labels)
                weights = torch.full(labels.shape, 1.0 / n_retain, device=device)
                ce = asu_kernels.linear_cross_entropy(torch.cat(r_rows), weight, labels, weights=weights)
                loss = loss + ce.float()
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
        base += n_seq
    return losses


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token ``t<i>`` is id ``i``, so text rows carry the benchmark's token ids.

    Ids 0/1/2 are pad/bos/eos; 3..5 are the words of the plain QA prompt (``Question``, ``Answer``, ``:``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "Question": 3, "Answer": 4, ":": 5}
    vocab.update({f"t{i}": i for i in range(FIRST_WORD, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def text_rows(examples: list[Example]) -> list[dict[str, str]]:
    """TOFU-format rows (``question``/``answer``) spelling each example's token ids as words ``t<i>``."""

    def words(ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    return [
        {"question": words(ex.ids[1 : ex.prompt]), "answer": words(ex.ids[ex.prompt : -1])} for ex in examples
    ]


def unlearn_epoch(model: torch.nn.Module, cfg: E2EConfig, forget, retain, device: str) -> list[float]:
    """One epoch of the package's own entry point, ``asu.unlearn.unlearn`` (a transformers Trainer) with the
    ``cache`` teacher and packing, on the same examples; returns the logged loss of every optimiser step.

    Its data order, forget/retain pairing and learning-rate schedule are the Trainer's, so its losses are not
    step-for-step comparable with the two pipelines above; its time and memory are.
    """
    micro = min(8, cfg.batch)
    ucfg = UnlearnConfig(
        method="asu",
        temperature=cfg.temperature,
        lam=cfg.lam,
        retain_loss="nll",
        teacher="cache",
        lr=cfg.lr,
        epochs=1,
        lora_r=cfg.lora_r,
        batch_size=micro,
        grad_accum=max(1, cfg.batch // micro),
        max_length=cfg.pad_to,
        pack=True,
        pack_tokens=cfg.pack_tokens,
        seed=cfg.seed,
        progress=False,
    )
    result = unlearn(
        model, word_tokenizer(cfg.model["vocab_size"]), text_rows(forget), text_rows(retain), ucfg
    )
    return [float(h["loss"]) for h in result.history if "loss" in h]


def run(
    rec: Recorder, suite: str, *, tiny: bool = False, examples: int | None = None, model: str | None = None
) -> None:
    """Run the pipelines for one epoch and record wall time, tokens/s, peak memory and losses.

    ``model`` picks the shape (:func:`make_config`); the full suite on CUDA runs ``llama-1b`` and then
    ``llama-8b-lora``.
    """
    if model is None and suite == "full" and rec.device.startswith("cuda"):
        for name in ("llama-1b", "llama-8b-lora"):
            run(rec, suite, tiny=tiny, examples=examples, model=name)
        return
    device = rec.device
    cfg = make_config(device, tiny=tiny, examples=examples, model=model)
    forget, retain = make_data(cfg)
    real_tokens = sum(len(ex.ids) for ex in forget + retain)
    columns = {
        "dtype": cfg.dtype,
        "batch": cfg.batch,
        "heads_q": cfg.model["num_attention_heads"],
        "heads_kv": cfg.model["num_key_value_heads"],
        "head_dim": cfg.model["head_dim"],
        "causal": True,
        "temperature": cfg.temperature,
        "tokens": real_tokens,
        "hidden": cfg.model["hidden_size"],
        "vocab": cfg.model["vocab_size"],
        "params": cfg.params(),
    }
    epochs = {"authors": authors_epoch, "ours": ours_epoch, "asu-unlearn": unlearn_epoch}
    notes = {
        "authors": "teacher forward every step",
        "ours": "cache pass included",
        "asu-unlearn": "asu.unlearn() Trainer, teacher=cache, packing; cache pass included",
    }
    for provider, epoch in epochs.items():
        row = {"benchmark": "e2e", "provider": provider, "mode": "epoch", **columns}

        def body(provider=provider, row=row, epoch=epoch) -> None:
            model = build_model(cfg, device, "eager" if provider == "authors" else "asu")
            result: dict[str, Any] = {}

            def timed() -> None:
                t0 = time.perf_counter()
                result["losses"] = epoch(model, cfg, forget, retain, device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                result["s"] = time.perf_counter() - t0

            mem, what = peak_memory_gb(timed, device)
            rec.add(row, "s", result["s"], note=notes[provider])
            rec.add(row, "tokens/s", real_tokens / result["s"], note="real (unpadded) tokens of the epoch")
            rec.add(row, "GB", mem, note=what)
            if provider == "asu-unlearn":
                return  # its step losses follow the Trainer's data order and schedule: not comparable
            rec.add(row, "loss_first", result["losses"][0], note="loss of the first optimiser step")
            rec.add(row, "loss_last", result["losses"][-1], note="loss of the last optimiser step")

        rec.guarded(row, body, metric="s")
