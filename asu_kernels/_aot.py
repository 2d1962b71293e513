"""Ahead-of-time compile specs: how each kernel module lists the configurations it may launch.

Every kernel module exposes ``aot_specs() -> list[AOTSpec]``; ``benchmarks/compile_report.py`` and the
compile test build each spec for sm_80 and sm_90 with ``triton.compile(ASTSource(...), target=GPUTarget)``
without a GPU, and read shared memory, registers and spills.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AOTSpec:
    """One kernel configuration to compile.

    Attributes:
        name: readable id, e.g. ``"attn_fwd[D=128,bf16,causal,BLOCK_M=128,BLOCK_N=64,w8,s3]"``.
        fn: the raw ``triton.JITFunction`` (for an autotuned kernel, ``kernel.fn``).
        signature: argument name -> Triton type string (``"*bf16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
        constexprs: values of the ``constexpr`` arguments (autotuned meta-parameters included).
        num_warps, num_stages: launch options.
        h100_candidate: a config the autotuner may pick on an H100 at head dim 128; must not spill.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    h100_candidate: bool = False
