"""The ops dispatcher: backend resolution, clear errors for unknown or unavailable backends."""

from __future__ import annotations

import importlib.abc
import sys
import types

import pytest
import torch

from lifelong.core.errors import ConfigError
from lifelong.ops import ENV_VAR, implementation, nn_search, register, resolve_backend


def test_default_is_cpu_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter never becomes the default
    assert resolve_backend(None) == "cpu"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend(None) == "reference"
    assert implementation("nn_search").__name__ == "_nn_search_reference"
    assert resolve_backend("cpu") == "cpu"  # an explicit name wins over the environment


@pytest.mark.parametrize("name", ["gpu", "", "CPU"])
def test_unknown_backend_is_a_config_error(monkeypatch, name):
    with pytest.raises(ConfigError, match="unknown ops backend"):
        resolve_backend(name)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ConfigError, match="unknown ops backend 'cuda'"):
        resolve_backend(None)


def test_triton_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    with pytest.raises(ConfigError, match="triton package is not installed"):
        resolve_backend("triton")
    with pytest.raises(ConfigError, match="triton"):
        nn_search(torch.zeros(1, 2, dtype=torch.int8), torch.tensor([0]), torch.tensor([1]), torch.tensor([0]),
                  torch.ones(1, 2), k=1, backend="triton")


def test_triton_without_cuda_is_a_config_error_unless_interpreted(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton") == "triton"


def test_triton_is_the_default_where_cuda_is_present_and_triton_imports(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    assert resolve_backend(None) == "triton"
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert resolve_backend(None) == "cpu"  # the environment still wins
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setitem(sys.modules, "triton", None)
    assert resolve_backend(None) == "cpu"  # CUDA without triton


def test_registration_refuses_unknown_backends_and_duplicates():
    with pytest.raises(ValueError, match="unknown backend"):
        register("nn_search", "gpu")
    with pytest.raises(ValueError, match="already has a cpu implementation"):
        register("nn_search", "cpu")(lambda: None)
    with pytest.raises(ConfigError, match="op 'no_such_op' has no cpu implementation"):
        implementation("no_such_op", "cpu")


class _BrokenTriton(importlib.abc.MetaPathFinder):
    """Finds ``triton`` and fails to load it, as an install missing its CUDA libraries would."""

    def find_spec(self, name, path, target=None):
        if name == "triton":
            raise RuntimeError("libcuda.so not found")


def test_a_broken_triton_install_says_why(monkeypatch):
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTriton(), *sys.meta_path])
    with pytest.raises(ConfigError, match=r"triton does not import \(RuntimeError: libcuda.so not found\)"):
        resolve_backend("triton")
