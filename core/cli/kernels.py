"""`pegboard kernels build` — compile ahead, on a machine with nvcc and no GPU, the FlashInfer
kernels the `flashinfer` attention backend needs for some model configs, so that a GPU host
(even an air-gapped one) compiles nothing.

    pegboard kernels build --arch 9.0a --config qwen3-0.6b --config llama-3.1-8b --out .kernels
    pegboard kernels build ... --kv-cache-dtype auto --kv-cache-dtype fp8_e4m3   # + FP8 pools
    pegboard serve ... --attention flashinfer --flashinfer-kernel-dir .kernels

`--dry-run` lists the kernels without compiling. See docs/kernels.md (`flashinfer`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

#: What `--arch` accepts: FlashInfer's FLASHINFER_CUDA_ARCH_LIST entries (e.g. 9.0a, 8.0).
ARCH_PATTERN = re.compile(r"^(\d+)\.(\d+)[af]?$")


class KernelsError(Exception):
    """A user error: the message says what to change."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="prebuild FlashInfer kernels")
    kinds = p.add_subparsers(dest="kernels", metavar="ACTION", required=True)
    b = kinds.add_parser(
        "build",
        help="compile the FlashInfer kernels of model configs ahead of time (nvcc, no GPU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--arch",
        required=True,
        help="target CUDA architecture(s), space-separated, as FLASHINFER_CUDA_ARCH_LIST: "
        "9.0a for H100/H200, 8.0 for A100",
    )
    b.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="NAME",
        help="a bundled model config (repeatable; default: all bundled), or a path to a "
        "config.json or a model directory",
    )
    b.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float16")
    b.add_argument(
        "--kv-cache-dtype",
        action="append",
        default=None,
        metavar="TYPE",
        help="the KV pools to build for, as `serve --kv-cache-dtype`: auto (the model's dtype, "
        "the default) or fp8_e4m3; repeatable",
    )
    b.add_argument("--out", type=Path, required=True, metavar="DIR", help="kernel directory")
    b.add_argument("--dry-run", action="store_true", help="list the kernels, compile nothing")
    b.add_argument("--force", action="store_true", help="recompile kernels already in DIR")
    b.add_argument("--json", action="store_true", help="print the kernel list as JSON")
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    try:
        return _build(args)
    except KernelsError as e:
        print(f"pegboard kernels: error: {e}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    import importlib.util

    arch = check_arch(args.arch)
    if importlib.util.find_spec("flashinfer") is None:
        raise KernelsError(
            "FlashInfer is not installed: pip install 'pegboard[gpu]' (flashinfer-python)"
        )
    from pegboard.plugins.kernels import flashinfer_kernels as fk

    if args.dtype not in fk.DTYPES:
        raise KernelsError(f"--dtype must be one of {', '.join(fk.DTYPES)}, not {args.dtype!r}")
    configs = args.config or _bundled()
    kv_names = args.kv_cache_dtype or ["auto"]
    kv_dtypes = [kv_storage(name) for name in kv_names]
    kernels: dict[str, fk.Kernel] = {}
    for name in configs:
        head_dim = config_head_dim(name)
        for kv_dtype in kv_dtypes:
            try:
                found = fk.required_kernels(head_dim, fk.DTYPES[args.dtype], kv_dtype)
            except ValueError as e:
                raise KernelsError(f"config {name}: {e}") from e
            kernels.update((k.name, k) for k in found)
    listing = list(kernels.values())
    if args.json:
        print(json.dumps([k.__dict__ for k in listing], indent=2))
    else:
        kv = "" if kv_names == ["auto"] else f", KV {'/'.join(kv_names)}"
        print(
            f"{len(listing)} FlashInfer kernels for {', '.join(configs)} "
            f"({args.dtype}{kv}, {arch}):"
        )
        for k in listing:
            print(f"  {k.kind:8} {k.name}")
    if args.dry_run:
        return 0
    try:
        built = fk.build(listing, args.out, arch, force=args.force, log=_stderr)
    except fk.BuildError as e:
        raise KernelsError(str(e)) from e
    size = sum((args.out / k.name / f"{k.name}.so").stat().st_size for k in listing)
    print(
        f"compiled {len(built)}, {len(listing) - len(built)} already there ({size / 2**20:.1f} "
        f"MiB of .so for these); use them with --flashinfer-kernel-dir {args.out} (or "
        f"{fk.KERNEL_DIR_ENV}={args.out})"
    )
    return 0


def kv_storage(name: str):
    """The KV storage type `--kv-cache-dtype NAME` builds for: None (the model's dtype) for
    auto, else the FP8 type (`serve --kv-cache-dtype`'s names)."""
    from pegboard.sdk.types import KV_CACHE_DTYPES

    if name == "auto":
        return None
    if name not in KV_CACHE_DTYPES:
        raise KernelsError(
            f"--kv-cache-dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}"
        )
    return KV_CACHE_DTYPES[name]


def check_arch(arch: str) -> str:
    """`arch` normalised to FlashInfer's space-separated list; KernelsError if malformed or
    older than sm_75 (FlashInfer's minimum)."""
    parts = arch.replace(",", " ").split()
    if not parts:
        raise KernelsError("--arch is empty; e.g. --arch 9.0a")
    for part in parts:
        m = ARCH_PATTERN.match(part)
        if not m:
            raise KernelsError(
                f"--arch {part!r} is not a CUDA architecture like 9.0a (H100), 8.0 (A100), 8.9"
            )
        if (int(m[1]), int(m[2])) < (7, 5):
            raise KernelsError(f"--arch {part}: FlashInfer needs sm_75 or newer")
    return " ".join(parts)


def config_head_dim(name: str) -> int:
    """The attention head size of a bundled config or of a config.json / model directory."""
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
    elif name in _bundled():
        from importlib import resources

        text = resources.files("pegboard.core").joinpath(f"configs/{name}.json").read_text()
        config = json.loads(text)
    else:
        raise KernelsError(
            f"unknown config {name!r}: give a bundled one ({', '.join(_bundled())}) or a path "
            "to a config.json or a model directory"
        )
    config = config.get("text_config", config)
    if config.get("head_dim"):
        return int(config["head_dim"])
    try:
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    except KeyError as e:
        raise KernelsError(f"config {name} has no head_dim nor {e.args[0]}") from e


def _bundled() -> list[str]:
    from pegboard.core.bench.models import bundled_configs

    return bundled_configs()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
