"""Serving ops behind one dispatcher: reference PyTorch, fast CPU and Triton.

- :func:`nn_search` / :func:`nn_search_naive` / :func:`bytes_moved`: int8 NN token search over
  a de-duplicated (jagged) batch of user sequences (:mod:`lifelong.ops.nn_search`).
- :func:`gather_tokens`, :func:`pack_rows`: a serving batch's shared token table
  (:mod:`lifelong.ops.token_table`).
- :func:`resolve_backend`, :func:`implementation`, :func:`register`: the dispatcher
  (:mod:`lifelong.ops.dispatch`); ``$LIFELONG_OPS_BACKEND`` overrides its default (``triton``
  where CUDA is present and triton imports, else ``cpu``).
- The ``triton`` kernels, imported on first use: the fused NN search
  (:mod:`lifelong.ops.triton_nn_search`) and SKUT, the one-kernel encoder layer
  (:mod:`lifelong.ops.triton_encoder`).
"""

from lifelong.ops.dispatch import BACKENDS, ENV_VAR, implementation, register, resolve_backend
from lifelong.ops.nn_search import bytes_moved, nn_search, nn_search_naive
from lifelong.ops.token_table import gather_tokens, pack_rows, unpack_rows

__all__ = ["BACKENDS", "ENV_VAR", "bytes_moved", "gather_tokens", "implementation",
           "nn_search", "nn_search_naive", "pack_rows", "register",
           "resolve_backend", "unpack_rows"]
