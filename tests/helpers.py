"""Helpers shared by the test files (no test module imports another).

The closeness rule for kernels (FlashAttention's testing convention): a result computed in a low precision
may be off the float64 reference by at most twice what PyTorch's own computation in that precision is off,
plus a small slack for the ulps of accumulation order.
"""

from __future__ import annotations

import torch


def assert_fa_close(
    what: str, got: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, slack: float
) -> None:
    """``max|got - exact| <= 2 * max|lowp - exact| + slack``; NaN never passes, infinities must match.

    Args:
        what: names the compared quantity in the failure message.
        got: the kernel's result.
        exact: the float64 reference on the same (rounded) inputs.
        lowp: the reference computed by PyTorch in the kernel's precision.
        slack: absolute slack (a few ulp of the output's scale).
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
    assert err <= 2 * base + slack, (
        f"{what}: max error {err:.3g} > 2 x low-precision error {base:.3g} + {slack:g}"
    )
