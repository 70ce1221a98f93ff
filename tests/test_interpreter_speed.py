"""`fixtures/interpreter_speed.py` (installed by conftest without a GPU): a kernel calling
`@triton.jit` helpers gives the same result with the language patched once per launch, and
`triton.language` is itself again after the launch."""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton interpreter's tests", allow_module_level=True)
triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from fixtures.interpreter_speed import speed_up_nested_calls  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


@triton.jit
def _square(x):
    return x * x


@triton.jit
def _plus_one(x):
    return _square(x) + 1


@triton.jit
def _kernel(X, Out, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + offs, _plus_one(tl.load(X + offs)) + _square(tl.load(X + offs)))


def test_nested_calls_patch_once_and_the_language_is_restored(monkeypatch):
    assert speed_up_nested_calls()  # (installed by conftest already: idempotent)
    walks = []  # the language walks (`_patch_builtin`, one per module or class patched)
    walk = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: walks.append(1) or walk(*a))
    interpreter._patch_lang.real(_kernel.fn).restore()
    once, walks[:] = len(walks), []
    x = torch.arange(32, dtype=torch.float32)
    out = torch.empty_like(x)
    _kernel[(4,)](x, out, BLOCK=8)
    torch.testing.assert_close(out, 2 * x * x + 1, atol=0, rtol=0)
    assert len(walks) == once  # the launch's, none for the 12 helper calls
    assert tl.core.is_builtin(tl.arange) and tl.core.is_builtin(tl.load)  # restored
