"""The Triton kernels build for a GPU (sm_90, ahead of time): the interpreter does not lower them.

The interpreter runs a kernel's Python on numpy, so a kernel it accepts can still fail to
compile for a GPU (a float64 ``tl.dot`` of K = 32, for one, does not lower to sm_90's MMA).
``triton.compile`` with an explicit target needs no GPU, only the ``ptxas`` the wheel ships.
It runs in a fresh process: with ``TRITON_INTERPRET=1`` (set for the tests without CUDA) the
kernels are defined for the interpreter instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

BUILD = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lifelong.ops import triton_encoder, triton_nn_search

def build(fn, types, constexprs, num_warps):
    signature = dict(zip(fn.arg_names, types + ["constexpr"] * len(constexprs)))
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared  # an H100/H200 block's shared memory
    print(fn.__name__, constexprs, "ok")

nn = triton_nn_search._nn_search_kernel
build(nn, ["*i8"] + ["*i64"] * 6 + ["*fp32", "*i64", "fp32", "i32", "i32", "i32"],
      {"D": 32, "BLOCK_C": triton_nn_search.BLOCK_C, "BLOCK_L": triton_nn_search.BLOCK_L, "K_PAD": 64},
      triton_nn_search.NUM_WARPS)
for dtype, name in ((torch.float16, "fp16"), (torch.float32, "fp32")):
    block_m, block_n, warps = triton_encoder.TILES[dtype]
    build(triton_encoder._skut_layer_kernel, [f"*{name}"] * 2 + ["*i64"] + [f"*{name}"] * 12 + ["i32"] + ["fp32"] * 3,
          {"D": 64, "H": 1, "FFN": 32, "BLOCK_M": block_m, "BLOCK_N": block_n, "FP16": name == "fp16"}, warps)
'''


def test_kernels_build_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", "import torch\n" + BUILD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(" ok") == 3
