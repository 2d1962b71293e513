"""Helpers shared by the test files (no test module imports another).

The closeness rule for kernels (FlashAttention's testing convention): a result computed in a low precision
may be off the float64 reference by at most twice what PyTorch's own computation in that precision is off,
plus a small slack for the ulps of accumulation order.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from asu.data import PackingCollator, PaddingCollator, encode_rows


def assert_fa_close(
    what: str, got: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, slack: float, factor: float = 2.0
) -> None:
    """``max|got - exact| <= factor * max|lowp - exact| + slack``; NaN never passes, infinities must match.

    Args:
        what: names the compared quantity in the failure message.
        got: the kernel's result.
        exact: the float64 reference on the same (rounded) inputs.
        lowp: the reference computed by PyTorch in the kernel's precision.
        slack: absolute slack (a few ulp of the output's scale).
        factor: how many times PyTorch's own low-precision error the kernel may make (2, FlashAttention's
            rule; a test that allows more says why).
    """
    got, exact, lowp = got.detach(), exact.detach(), lowp.detach()
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN in the result (unwritten or 0/0)"
    inf = torch.isinf(exact)
    assert torch.equal(torch.isinf(got), inf), f"{what}: infinities differ from the reference"
    if inf.any():
        assert torch.equal(got[inf].double(), exact[inf].double()), f"{what}: infinities of the wrong sign"
        got, exact, lowp = got[~inf], exact[~inf], lowp[~inf]
    if exact.numel() == 0:
        return
    err = (got.double() - exact.double()).abs().max().item()
    base = (lowp.double() - exact.double()).nan_to_num(0.0, 0.0, 0.0).abs().max().item()
    assert err <= factor * base + slack, (
        f"{what}: max error {err:.3g} > {factor:g} x low-precision error {base:.3g} + {slack:g}"
    )


# ---- the closeness rules of the model-level tests ----------------------------------------------------------


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, what: str = "", gradient: bool = False) -> None:
    """Two fp32 computations of the same math in a different order (asu's path against an independent one).

    Elementwise ``|got - want| <= 1e-5 + rtol * |want|`` with ``rtol = 1e-5``, or ``1e-4`` for gradients
    (longer sums of products than the values they come from); ``what`` prefixes the failure message.
    """
    rtol = 1e-4 if gradient else 1e-5
    msg = (lambda detail: f"{what}: {detail}") if what else None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=rtol, msg=msg)


def assert_weights_close(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Two training runs that should be the same run: every tensor of ``want`` within 1e-5 of ``got``'s."""
    for name, tensor in want.items():
        msg = lambda detail, name=name: f"{name}: {detail}"
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=0, msg=msg)


# ---- tiny models -------------------------------------------------------------------------------------------

CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def tiny_config(family: str = "llama", num_layers: int = 2, **overrides) -> transformers.PretrainedConfig:
    """A tiny decoder config: hidden size 64, MLP 128, 4 query heads over 2 key/value heads (of dimension 16
    where the family derives it from the hidden size; Qwen3 needs ``head_dim=16``), a vocabulary of 128 and
    ``num_layers`` layers; ``overrides`` set any other field or replace these."""
    if family not in CONFIGS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(CONFIGS)}")
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return CONFIGS[family](**{**fields, **overrides})


def tiny_model(
    family: str = "llama", vocab_size: int = 64, seed: int = 0, attn: str = "sdpa"
) -> torch.nn.Module:
    """The objectives' model: 2 layers, the test tokenizer's special ids, untied LM head, random init from
    ``seed`` with every projection widened 4x, fp32, eval mode; Mistral gets a sliding window of 8."""
    window = {"sliding_window": 8} if family == "mistral" else {}  # short enough that the test rows use it
    config = tiny_config(
        family,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **window,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    model.set_attn_implementation(attn)
    # Random init has tiny weights; widen them so attention temperature visibly changes the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    return model.eval()


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy with N(0, 0.02^2) added to every parameter: a student that differs from the original (so KL and
    ratios are not trivially zero)."""
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return student


# ---- plain computations on full logits (the objectives' independent references) ---------------------------


def hand_smoothed(model: torch.nn.Module, temperature: float, layers=None) -> torch.nn.Module:
    """An eager copy whose selected layers' attention logits are divided by ``temperature``."""
    teacher = copy.deepcopy(model)
    teacher.set_attn_implementation("eager")
    for i, layer in enumerate(teacher.model.layers):
        if layers is None or i in layers:
            layer.self_attn.scaling = layer.self_attn.scaling / temperature
    return teacher.eval()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0]


def plain_nll(model, examples, reduce="token") -> torch.Tensor:
    """Token-mean NLL over all examples' labels, or per-sequence sums and lengths."""
    sums, counts = [], []
    for ex in examples:
        labels = torch.tensor(ex["labels"])
        logits = full_logits(model, ex["input_ids"])[:-1]
        nll = F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
        sums.append(nll)
        counts.append(int((labels[1:] != -100).sum()))
    sums = torch.stack(sums)
    if reduce == "token":
        return sums.sum() / sum(counts)
    return sums, torch.tensor(counts, dtype=torch.float32)


def plain_kl(student, reference, examples, reduce="sequence") -> torch.Tensor:
    """KL(p_ref || p_S) at label-predicting positions: per-sequence mean then mean, or the token mean."""
    rows = []
    for ex in examples:
        labels = torch.tensor(ex["labels"])
        pos = torch.nonzero(labels[1:] != -100).flatten()
        log_s = F.log_softmax(full_logits(student, ex["input_ids"])[pos], -1)
        with torch.no_grad():
            log_r = F.log_softmax(full_logits(reference, ex["input_ids"])[pos], -1)
        rows.append(F.kl_div(log_s, log_r, reduction="none", log_target=True).sum(-1))
    if reduce == "token":
        return torch.cat(rows).mean()
    return torch.stack([r.mean() for r in rows]).mean()


# ---- the test tokenizer, rows and collators ----------------------------------------------------------------

WORDS = (
    "Question: Answer: the author was born in a city of rivers and wrote books about dragons , "
    "who where when what did write her his first novel is called under silver moon mother father "
    "worked as baker teacher sailor award won prize for poetry"
).split()

FORGET = [
    {"question": "who wrote the first novel ?", "answer": "the author wrote her first novel about dragons ."},
    {"question": "where was the author born ?", "answer": "in a city of rivers"},
    {"question": "what did his mother do ?", "answer": "his mother worked as a baker"},
    {"question": "what prize did she win ?", "answer": "she won the silver moon award for poetry ."},
    {"question": "when was her first novel ?", "answer": "under silver moon"},
]
RETAIN = [
    {"question": "who is the father ?", "answer": "the father was a sailor ."},
    {"question": "what did the teacher write ?", "answer": "the teacher wrote books about rivers and a city"},
    {"question": "where was the sailor born ?", "answer": "the sailor was born in a city"},
]


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the test vocabulary, BOS prepended, EOS ``</s>``."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS) | {"?", "."}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def encoded(tokenizer, rows: list[dict], max_length: int = 64) -> list[dict]:
    """``encode_rows`` with each example's index in ``rows`` as its ``example_id``."""
    return [{**ex, "example_id": i} for i, ex in enumerate(encode_rows(tokenizer, rows, max_length))]


COLLATORS = {
    "padded": PaddingCollator(pad_token_id=0),
    "packed": PackingCollator(max_tokens=40, pad_token_id=0),
}


# ---- a model with known answers ----------------------------------------------------------------------------


class BigramModel(torch.nn.Module):
    """Next-token logits from the current token only (``logits = table[input_ids]``), and greedy generation
    that ends a row at its first EOS and pads it after, as transformers' ``generate`` does: a model whose
    every probability and generation a test can write down."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.generation_config = None

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id):
        ids, done = input_ids, torch.zeros(len(input_ids), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = torch.where(done, pad_token_id, self.table[ids[:, -1]].argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, torch.tensor(eos_token_id))
            if done.all():
                break
        return ids


# ---- tiny configs of every decoder-only family of the coverage matrix --------------------------------------

_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128)
_GQA = dict(num_key_value_heads=2)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16)

# family -> (config class, fields beyond the shared ones). Windows of 4 keys, so 8-14 token rows lose keys to
# them; soft-caps and logit scales small or far from 1, so a path that ignored them would show.
FAMILY_CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, _GQA),
    "mistral": (transformers.MistralConfig, {**_GQA, "sliding_window": 4}),
    "mixtral": (
        transformers.MixtralConfig,
        {**_GQA, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2": (transformers.Qwen2Config, _GQA),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        {
            **_GQA,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "qwen3": (transformers.Qwen3Config, {**_GQA, "head_dim": 16}),
    "gemma": (transformers.GemmaConfig, {**_GQA, "head_dim": 16}),
    "gemma2": (
        transformers.Gemma2Config,
        {
            **_GQA,
            **_GEMMA,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 1.5,
        },
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        {
            **_GQA,
            **_GEMMA,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 1.5,
        },
    ),
    "phi": (transformers.PhiConfig, {**_GQA, "partial_rotary_factor": 0.5}),
    "phi3": (transformers.Phi3Config, {**_GQA, "partial_rotary_factor": 0.5}),
    "gpt_neox": (transformers.GPTNeoXConfig, {"rotary_pct": 0.25}),
    "olmo": (transformers.OlmoConfig, {**_GQA, "clip_qkv": 3.0}),
    "olmo2": (transformers.Olmo2Config, _GQA),
    "falcon": (transformers.FalconConfig, {"intermediate_size": None}),
    "stablelm": (transformers.StableLmConfig, {**_GQA, "partial_rotary_factor": 0.25, "qk_layernorm": True}),
    "granite": (
        transformers.GraniteConfig,
        {**_GQA, "attention_multiplier": 0.2, "logits_scaling": 4.0, "residual_multiplier": 0.5},
    ),
    "cohere": (transformers.CohereConfig, {**_GQA, "logit_scale": 0.5, "use_qk_norm": True}),
    "gpt2": (transformers.GPT2Config, {}),
}


def family_config(family: str, num_layers: int = 2, **overrides) -> transformers.PretrainedConfig:
    """A tiny config of one decoder-only family of :data:`FAMILY_CONFIGS` (hidden 64, 4 query heads of
    dimension 16, 2 key/value heads where the family has GQA, vocabulary 128, ``num_layers`` layers, the
    test tokenizer's special ids); ``overrides`` set any other field or replace these."""
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILY_CONFIGS)}")
    cls, extra = FAMILY_CONFIGS[family]
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":  # GPT-2 names its sizes itself
        fields = dict(n_embd=64, n_layer=num_layers, n_head=4, n_positions=64, vocab_size=128, **ids)
    else:
        fields = {**_SMALL, "num_hidden_layers": num_layers, "max_position_embeddings": 64, **ids, **extra}
        fields = {k: v for k, v in fields.items() if v is not None}
    return cls(**{**fields, **overrides})


def pairwise_auc(forget, holdout):
    """P(holdout score > forget score) + 0.5 P(tie), by counting every pair."""
    wins = sum((h > f) + 0.5 * (h == f) for f in forget for h in holdout)
    return wins / (len(forget) * len(holdout))
