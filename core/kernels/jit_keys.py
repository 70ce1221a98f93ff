"""Which Triton specializations a run meets: recorded on a CPU, counted on a GPU.

Triton's JIT keeps one compiled kernel per key: the constexpr values, each argument's dtype,
for each int argument not in the kernel's `do_not_specialize` whether it is 1, divisible by
16 or neither, for each pointer whether it is 16-byte aligned, and the launch options
(`num_warps`, `num_stages`, `launch_pdl`, ...). A key the process has not met yet costs a
compile (hundreds of ms) or, with a warm disk cache, a module load, in the middle of a step.
The engine's warm-up (the CUDA graph captures, the sampler's `warm_up`) should meet every key
a run will.

- `KeyRecorder` (CPU, `TRITON_INTERPRET=1`): every interpreted launch records
  `(kernel, key)` with the key computed by Triton's own binder for a CUDA target (sm_90), so it
  is the key the GPU's JIT would look up; recording is split into named phases (warm-up, run)
  and can be paused (a CUDA graph replay launches nothing on the GPU).
- `CompileCounter` (GPU): every specialization the JIT compiles or loads in this process,
  through `triton.knobs.runtime.jit_post_compile_hook`.

`pegboard.core.bench.triton_keys` drives the engine under the recorder; docs/kernels.md,
"Triton specializations", lists what each kernel keys on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: The target whose specialization rules the recorder applies (the H100/H200's).
CUDA_CAPABILITY = 90


@dataclass(frozen=True, order=True)
class LaunchKey:
    """One compiled specialization: the kernel (`module:name`) and what the JIT keys it by,
    readable (`name:type:spec` per argument, `name=value` per constexpr, then the options)."""

    kernel: str
    key: str

    def __str__(self) -> str:
        return f"{self.kernel}[{self.key}]"


@functools.cache
def _cuda_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", CUDA_CAPABILITY, 32))


def _binder(fn):
    """Triton's argument binder for an interpreted kernel `fn`, built as `JITFunction` builds
    it (`create_function_from_signature`, the kernel's `do_not_specialize` lists) but for a
    CUDA backend: it returns the specialization the GPU's JIT would compute."""
    binder = getattr(fn, "_pegboard_cuda_binder", None)
    if binder is None:
        from triton.runtime.jit import KernelParam, create_function_from_signature

        sig = inspect.signature(fn.fn)
        dns = fn.kwargs.get("do_not_specialize") or ()
        dnsoa = fn.kwargs.get("do_not_specialize_on_alignment") or ()
        params = [
            KernelParam(i, p, i in dns or p.name in dns, i in dnsoa or p.name in dnsoa)
            for i, p in enumerate(sig.parameters.values())
        ]
        binder = create_function_from_signature(sig, params, _cuda_backend())
        fn._pegboard_cuda_binder = binder
    return binder


def launch_key(fn, args: tuple, kwargs: dict) -> LaunchKey:
    """The key the CUDA JIT would compile interpreted kernel `fn` under for this launch."""
    bound, specialization, options = _binder(fn)(*args, **kwargs)
    parts = []
    for name, spec in zip(bound, specialization):
        kind, value = spec[0], spec[1] if len(spec) > 1 else None
        if kind == "constexpr":
            parts.append(f"{name}={_constant(value)}")
        else:
            parts.append(f"{name}:{kind}" + (f":{value}" if value else ""))
    parts += [f"{k}={v}" for k, v in sorted(options.items())]
    return LaunchKey(f"{fn.fn.__module__}:{fn.fn.__qualname__}", ", ".join(parts))


def _constant(value) -> str:
    fn = getattr(value, "fn", None)  # a jit function passed as a constexpr
    return f"{fn.__module__}:{fn.__qualname__}" if fn is not None else repr(value)


class KeyRecorder:
    """Records every interpreted Triton launch's CUDA key, per phase (a context manager; one
    at a time). Needs `TRITON_INTERPRET=1` before the kernels were defined.

    `phase(name)` switches the phase launches are recorded under (`"run"` at the start);
    `paused()` records nothing (a CUDA graph replay: the GPU launches no kernel then).
    `new_keys(after, before)`: the keys met in phase `after` but in none of `before`.

    `execute(kernel)` (default: every kernel) says which launches the interpreter runs; the
    others are recorded only, their outputs left as they were. Keys depend on shapes,
    pointers and host integers, never on values: a run whose schedule does not depend on
    values either (`ignore_eos`) may skip the costly kernels (`pegboard.core.bench.triton_keys`
    runs only the sampler's, whose token ids the engine checks)."""

    def __init__(self, execute: Callable[[str], bool] | None = None) -> None:
        self.execute = execute
        self.phases: dict[str, dict[LaunchKey, int]] = {}
        self.current = "run"
        self._paused = 0
        self._original = None

    def __enter__(self) -> KeyRecorder:
        from triton import knobs
        from triton.runtime.interpreter import InterpretedFunction

        if not knobs.runtime.interpret:
            raise RuntimeError("KeyRecorder needs TRITON_INTERPRET=1 set before triton's import")
        if getattr(InterpretedFunction.run, "_pegboard_recording", False):
            raise RuntimeError("a KeyRecorder is recording already")
        original = self._original = InterpretedFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            if not warmup:
                kernel = f"{fn.fn.__module__}:{fn.fn.__qualname__}"
                if not recorder._paused:
                    recorder.add(launch_key(fn, args, kwargs))
                if recorder.execute is not None and not recorder.execute(kernel):
                    return None
            return original(fn, *args, grid=grid, warmup=warmup, **kwargs)

        run._pegboard_recording = True
        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc: object) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._original

    def add(self, key: LaunchKey) -> None:
        counts = self.phases.setdefault(self.current, {})
        counts[key] = counts.get(key, 0) + 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def keys(self, *phases: str) -> set[LaunchKey]:
        """The keys met in any of `phases` (every phase if none is named)."""
        names = phases or tuple(self.phases)
        return {k for p in names for k in self.phases.get(p, {})}

    def new_keys(self, after: str = "run", before: tuple[str, ...] = ("warm-up",)) -> list:
        """The keys of phase `after` that no phase of `before` met, sorted."""
        return sorted(self.keys(after) - self.keys(*before))


class CompileCounter:
    """On a GPU: every specialization Triton's JIT compiles (or loads from its disk cache)
    in this process while active, as `(kernel, Triton's description)`, through
    `knobs.runtime.jit_post_compile_hook` (a context manager; it chains a hook set before)."""

    def __init__(self) -> None:
        self.compiled: list[tuple[str, str]] = []
        self._previous = None

    def __enter__(self) -> CompileCounter:
        from triton import knobs

        self._previous = previous = knobs.runtime.jit_post_compile_hook

        def hook(*args, **kwargs):
            fn = kwargs.get("fn")
            name = f"{fn.module}:{fn.name}" if fn is not None else "?"
            self.compiled.append((name, str(kwargs.get("repr", ""))))
            return previous(*args, **kwargs) if previous is not None else None

        knobs.runtime.jit_post_compile_hook = hook
        return self

    def __exit__(self, *exc: object) -> None:
        from triton import knobs

        knobs.runtime.jit_post_compile_hook = self._previous
