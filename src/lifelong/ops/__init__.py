"""Serving ops behind one dispatcher: reference PyTorch, fast CPU and Triton.

- :func:`nn_search` / :func:`nn_search_naive` / :func:`bytes_moved`: int8 NN token search over
  a de-duplicated (jagged) batch of user sequences (:mod:`lifelong.ops.nn_search`).
- :class:`FusedTransActEncoder`: TransAct's encoder over a token table with a fused first
  layer (:mod:`lifelong.ops.encoder`).
- :func:`resolve_backend`, :func:`implementation`, :func:`register`: the dispatcher
  (:mod:`lifelong.ops.dispatch`); ``$LIFELONG_OPS_BACKEND`` overrides its default (``triton``
  where CUDA is present and triton imports, else ``cpu``).
- The ``triton`` kernels, imported on first use: the fused NN search
  (:mod:`lifelong.ops.triton_nn_search`) and SKUT, the one-kernel encoder layer
  (:mod:`lifelong.ops.triton_encoder`).
"""

from lifelong.ops.dispatch import BACKENDS, ENV_VAR, implementation, register, resolve_backend
from lifelong.ops.encoder import FusedTransActEncoder, gather_tokens
from lifelong.ops.nn_search import bytes_moved, nn_search, nn_search_naive

__all__ = ["BACKENDS", "ENV_VAR", "FusedTransActEncoder", "bytes_moved", "gather_tokens", "implementation",
           "nn_search", "nn_search_naive", "register", "resolve_backend"]
