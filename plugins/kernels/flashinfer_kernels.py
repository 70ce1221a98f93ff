"""The FlashInfer kernels the `flashinfer` attention backend runs, and building them ahead.

FlashInfer ships no compiled attention kernels: each (kernel, dtype, KV dtype, head size) is a
JIT module that nvcc compiles at first use (about 1-2 minutes each). The backend needs two per
head size, dtype and KV storage type (the model's dtype, or float8 e4m3 for an FP8 pool, which
both kernels read in place and convert in registers):

- `decode` — `BatchDecodeWithPagedKVCacheWrapper`'s CUDA-core kernel (GQA groups 1-4 and 8);
- `prefill` — the FA2 paged prefill kernel of `BatchPrefillWithPagedKVCacheWrapper`, which
  also serves tensor-core decode (any group size).

`build` compiles them on a machine with nvcc and no GPU (`pegboard kernels build`) into a
directory laid out as FlashInfer's ahead-of-time kernels (`DIR/<name>/<name>.so`) with a
`manifest.json`. `use_kernel_dir(DIR)` points FlashInfer at such a directory: a module found
there is loaded without compiling.

Naming kernels needs `flashinfer` importable (no GPU); building needs nvcc too. Nothing here
imports flashinfer at module import time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: Head sizes FlashInfer's FA2 prefill and decode kernels are instantiated for.
SUPPORTED_HEAD_DIMS = (64, 128, 256)
#: GQA group sizes the CUDA-core decode kernel is compiled for (others need tensor cores).
DECODE_GROUP_SIZES = (1, 2, 3, 4, 8)
#: Element types `--dtype` accepts.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: KV storage types the kernels are built for: the model's dtype or float8 e4m3 (an FP8 pool,
#: `--kv-cache-dtype fp8_e4m3`; FlashInfer's FA2 kernels take bf16/fp16 queries over it).
KV_DTYPES = {**DTYPES, "float8_e4m3fn": torch.float8_e4m3fn}
#: The environment variable naming a directory of prebuilt kernels.
KERNEL_DIR_ENV = "PEGBOARD_FLASHINFER_KERNELS"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Kernel:
    """One FlashInfer JIT module: `kind` is "decode" or "prefill" (FA2); `dtype` the queries'
    and output's type, `kv_dtype` the KV pool's; `name` its URI, the name of its `.so` and of
    its folder in an ahead-of-time kernel directory."""

    kind: str
    head_dim: int
    dtype: str
    kv_dtype: str
    name: str


def required_kernels(
    head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None
) -> list[Kernel]:
    """The decode and FA2 prefill kernels of one head size, dtype and KV storage type (default:
    `dtype`; int32 indices, no positional encoding in the kernel, no sliding window, no logits
    soft cap)."""
    from flashinfer.jit import attention as fa

    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"FlashInfer's attention kernels support head sizes {SUPPORTED_HEAD_DIMS}, "
            f"not {head_dim}"
        )
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    q_name = _dtype_name(dtype, DTYPES, "FlashInfer kernels are prebuilt for")
    kv_name = _dtype_name(kv_dtype, KV_DTYPES, "FlashInfer kernels read KV caches of")
    names = (q_name, kv_name)
    common = (dtype, kv_dtype, dtype, torch.int32, head_dim, head_dim, 0, False, False)
    return [
        Kernel("decode", head_dim, *names, fa.get_batch_decode_uri(*common)),
        Kernel("prefill", head_dim, *names, fa.get_batch_prefill_uri("fa2", *common, False)),
    ]


def jit_spec(kernel: Kernel):
    """FlashInfer's `JitSpec` of `kernel` (generates its sources; needs a CUDA arch list: a
    GPU or FLASHINFER_CUDA_ARCH_LIST)."""
    from flashinfer.jit import attention as fa

    dtype, kv = DTYPES[kernel.dtype], KV_DTYPES[kernel.kv_dtype]
    common = (dtype, kv, dtype, torch.int32, kernel.head_dim, kernel.head_dim, 0, False, False)
    if kernel.kind == "decode":
        return fa.gen_batch_decode_module(*common)
    return fa.gen_batch_prefill_module("fa2", *common, False)


def use_kernel_dir(path: str | os.PathLike) -> Path:
    """Make FlashInfer load its JIT modules from `path` (`<name>/<name>.so`, as `build` writes
    them) instead of its package's `data/aot`; modules missing there are compiled as usual.
    Raises when `path` holds kernels built for another FlashInfer version."""
    from flashinfer import __version__ as installed
    from flashinfer.jit import env as jit_env

    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"FlashInfer kernel directory {path} does not exist")
    manifest = read_manifest(path)
    built_for = manifest.get("flashinfer")
    if built_for and built_for != installed:
        raise RuntimeError(
            f"the kernels in {path} were built for flashinfer {built_for}, and {installed} is "
            "installed; rebuild them with `pegboard kernels build`"
        )
    jit_env.FLASHINFER_AOT_DIR = path
    return path


def prebuilt(kernel: Kernel) -> bool:
    """Whether FlashInfer will load `kernel` without compiling (found in its AOT directory)."""
    from flashinfer.jit import env as jit_env

    return (jit_env.FLASHINFER_AOT_DIR / kernel.name / f"{kernel.name}.so").is_file()


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else {}


def _dtype_name(dtype: torch.dtype, names: dict[str, torch.dtype], what: str) -> str:
    for name, value in names.items():
        if value == dtype:
            return name
    raise ValueError(f"{what} {list(names)}, not {dtype}")


# ------------------------------------------------------------------ building (no GPU needed)


class BuildError(RuntimeError):
    """A kernel build cannot start or failed; the message names what is missing."""


def build_environment(arch: str, work: Path) -> dict[str, str]:
    """The environment a FlashInfer JIT build needs on a machine without a GPU: the target arch
    list, CUDA_HOME, a workspace under `work`, `ninja` on PATH and a stub `libcuda.so` to link
    against (made with the host compiler when the CUDA toolkit has none). Raises `BuildError`
    naming whatever is missing and cannot be made here."""
    env = dict(os.environ)
    cuda_home = find_cuda_home(env)
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    missing = [tool for tool in ("ninja", "c++") if shutil.which(tool, path=path) is None]
    if missing:
        raise BuildError(
            f"{' and '.join(missing)} not found on PATH: FlashInfer's JIT build needs "
            "`ninja` (pip install ninja) and a C++ compiler (apt-get install g++)"
        )
    library_path = [p for p in env.get("LIBRARY_PATH", "").split(os.pathsep) if p]
    if not _find_libcuda([str(cuda_home / "lib64" / "stubs"), *library_path]):
        stub = work / "libcuda-stub"
        _make_libcuda_stub(stub)
        library_path.insert(0, str(stub))
    env.update(
        CUDA_HOME=str(cuda_home),
        FLASHINFER_CUDA_ARCH_LIST=arch,
        FLASHINFER_WORKSPACE_BASE=str(work),
        LIBRARY_PATH=os.pathsep.join(library_path),
        PATH=path,
    )
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return env


def find_cuda_home(env: dict[str, str], standard: tuple[str, ...] = ("/usr/local/cuda",)) -> Path:
    """The CUDA toolkit to build with: the first of $CUDA_HOME, $CUDA_PATH, the `standard`
    places and the folder above `nvcc` on PATH that has `bin/nvcc` and `lib64/libcudart.so`
    (FlashInfer links with `-L$CUDA_HOME/lib64 -lcudart`; an `nvcc` wrapper script is not)."""
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), *standard]
    candidates.append(str(Path(nvcc).resolve().parents[1]) if nvcc else None)
    checked = []
    for candidate in filter(None, candidates):
        home = Path(candidate)
        if (home / "bin" / "nvcc").is_file() and (home / "lib64" / "libcudart.so").exists():
            return home
        checked.append(str(home))
    raise BuildError(
        "no CUDA toolkit found (needs bin/nvcc and lib64/libcudart.so; checked "
        f"{', '.join(checked) or 'nothing'}): install the CUDA toolkit (13.x) or set CUDA_HOME"
    )


def _find_libcuda(dirs: list[str]) -> bool:
    return any((Path(d) / "libcuda.so").exists() for d in dirs)


def _make_libcuda_stub(folder: Path) -> None:
    """An empty `libcuda.so` with the driver's soname: the kernels link with `-lcuda`, and the
    real driver library is found by that soname on the GPU host."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "stub.c"
    source.write_text("/* stands in for the CUDA driver library at link time */\n")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BuildError("no C compiler (cc) to make a stub libcuda.so: apt-get install gcc")
    result = subprocess.run(
        [cc, "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so"), str(source)],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise BuildError(f"making a stub libcuda.so failed: {result.stderr.strip()}")


def build(
    kernels: list[Kernel],
    out: Path,
    arch: str,
    *,
    force: bool = False,
    log=print,
) -> list[Kernel]:
    """Compile `kernels` for `arch` into `out/<name>/<name>.so` (skipping those already there
    unless `force`) and write `out/manifest.json`. Each kernel is compiled in a child process
    (FlashInfer reads its arch list when imported). Returns the kernels compiled now."""
    from flashinfer import __version__ as flashinfer_version

    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    if manifest and manifest.get("flashinfer") != flashinfer_version:
        raise BuildError(
            f"{out} holds kernels built for flashinfer {manifest.get('flashinfer')}, and "
            f"{flashinfer_version} is installed: choose another --out or empty it"
        )
    if manifest and manifest.get("arch") != arch:
        raise BuildError(
            f"{out} holds kernels built for arch {manifest.get('arch')}, not {arch}: "
            "choose another --out or empty it"
        )
    todo = [k for k in kernels if force or not (out / k.name / f"{k.name}.so").is_file()]
    with tempfile.TemporaryDirectory(prefix="pegboard-flashinfer-build-") as tmp:
        env = build_environment(arch, Path(tmp)) if todo else {}
        for i, kernel in enumerate(todo, 1):
            what = (
                f"{kernel.kind} ({kernel.dtype}, KV {kernel.kv_dtype}, head_dim {kernel.head_dim})"
            )
            log(f"[{i}/{len(todo)}] compiling {what}: {kernel.name}")
            start = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", __name__, json.dumps(asdict(kernel)), str(out)],
                env=env,
                capture_output=True,
                text=True,
            )
            if result.returncode:
                raise BuildError(
                    f"compiling {kernel.name} failed:\n{_tail(result.stderr)}{_hint(result.stderr)}"
                )
            log(f"      done in {time.monotonic() - start:.0f} s")
    entries = {k["name"]: k for k in manifest.get("kernels", [])}
    entries.update({k.name: asdict(k) for k in kernels})
    manifest = {
        "flashinfer": flashinfer_version,
        "arch": arch,
        "kernels": sorted(entries.values(), key=lambda k: k["name"]),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return todo


def _hint(stderr: str) -> str:
    """What to install when nvcc failed on a header of a CUDA library the toolkit lacks."""
    for lib in ("cublas", "curand"):
        if f"{lib}" in stderr and "No such file" in stderr:
            return (
                f"\n{lib} headers are missing: pip install nvidia-{lib} and add its include "
                "directory (site-packages/nvidia/*/include) to CPATH"
            )
    return ""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _compile_one(kernel: Kernel, out: Path) -> None:
    """In the child process: compile `kernel` in FlashInfer's JIT workspace, copy the .so."""
    spec = jit_spec(kernel)
    spec.build(verbose=False)
    target = out / kernel.name / f"{kernel.name}.so"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(spec.jit_library_path, target)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile one kernel (used by `build`)")
    parser.add_argument("kernel", help="the Kernel as JSON")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    _compile_one(Kernel(**json.loads(args.kernel)), args.out)
