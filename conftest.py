"""Session-wide test setup that must run before any test or doctest module is imported.

Triton decides at ``@triton.jit`` time whether a kernel is compiled for a GPU or run by its
CPU interpreter, from ``TRITON_INTERPRET``. Without CUDA the kernels' modules must therefore
be imported with ``TRITON_INTERPRET=1`` already set, in every xdist worker: this file, at the
rootdir, is loaded before anything is collected. The dispatcher never picks the interpreter
by default, so tests that do not ask for ``triton`` are unaffected.

Without the optional ``triton`` package (``pip install -e '.[gpu]'``) the kernels' modules
cannot be imported, so their doctest collection is skipped; their tests skip themselves.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken install; the dispatcher's tests say why
        return False


collect_ignore_glob = [] if _triton_installed() else ["src/lifelong/ops/triton_*.py"]
