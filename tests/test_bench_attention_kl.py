"""The attention-KL benchmark in CPU mode: every provider's row KLs agree, and the suite writes its rows."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_attention_kl as B
from benchmarks.common import Recorder, read_csv


def _shape() -> B.KLShape:
    return B.KLShape(1, 4, 2, 37, 16, True, 2.3, torch.float32)


# Uncompiled FlexAttention (the only kind a CPU test can afford) warns that it materialises the scores.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("name", ["dense", "flex", "ours"])
def test_provider_matches_float64_reference(name):
    shape = _shape()
    q_s, k_s, q_t, k_t = B._input_sets(shape, "cpu", 1, seed=3)[0]
    if name == "flex":
        # Uncompiled FlexAttention runs on CPU: the same composition the CUDA benchmark compiles.
        prov = B.FlexComposition(shape, "cpu", compile=False)
    else:
        prov = B.make_provider(name, shape, "cpu")
    want = B.reference_kl(shape, q_s, k_s, q_t, k_t)
    assert want[..., 1:].min() > 0  # teacher differs from student (row 0 sees one key: KL 0)
    if name == "flex":
        # FlexAttention has no CPU backward: the forward (values [K_T | K_S], natural-log LSEs) is checked.
        with torch.no_grad():
            torch.testing.assert_close(prov(q_s, k_s, q_t, k_t).double(), want, rtol=1e-4, atol=1e-5)
        return
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    got = prov(q_s, k_s, q_t, k_t)
    assert got.shape == (1, 4, 37)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # Gradients against the dense float64 composition.
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (q_s, k_s), g.to(got.dtype))
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q_s, k_s))
    exact = B.KLShape(**{**shape.__dict__, "dtype": torch.float64})
    ref = B.Dense(exact, "cpu")(q64, k64, q_t.double(), k_t.double())
    want_grads = torch.autograd.grad(ref, (q64, k64), g)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_cpu_suite_rows(tmp_path, monkeypatch):
    # The PyTorch path for "ours": the kernel is checked above; interpreted timing loops would take minutes.
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")
    rec = Recorder(tmp_path / "kl.csv", "cpu", verbose=False)
    B.run(rec, "quick", tiny=True)
    rows = read_csv(tmp_path / "kl.csv")
    by = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    for prov in ("dense", "ours"):
        for mode in B.MODES:
            for metric in ("ms", "GB"):
                r = by[(prov, mode, metric)]
                assert r["status"] == "ok" and float(r["median"]) > 0, r
        assert float(by[(prov, "fwd", "max_abs_err")]["median"]) < 1e-4
    assert by[("flex", "fwd", "ms")]["status"] == "skip"  # compiled flex is CUDA only
    assert {r["benchmark"] for r in rows} == {"attention_kl"}
    # The report renders them: one table per mode, with the dense/ours ratios filled in.
    from benchmarks import report

    text = "\n".join(report.attention_kl_section(report.load_rows(tmp_path)))
    for mode in B.MODES:
        assert f"‖ student attention)**, {mode}" in text
    ratio_line = next(line for line in text.splitlines() if line.startswith("| 64 |"))
    assert "—" not in ratio_line.split("|")[-3]  # dense/ours time ratio present
