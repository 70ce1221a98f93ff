"""The decode kernel compiled for sm_90 on any machine (Triton compiles ahead with the `ptxas`
it ships): the variants the engine runs must build for the GPU, which the interpreter does not
check (a plain float global read by a kernel ran in the interpreter and failed on the H200).
Runs in a subprocess: other test modules import the kernels under TRITON_INTERPRET=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")

from pegboard.plugins.kernels.triton_attention.decode_configs import (  # noqa: E402
    DECODE_DEFAULTS,
    DECODE_VARIANTS,
    FP8_MMA_DEFAULTS,
)

COMBOS = ("bf16 group 2", "bf16 group 4 split", "fp8 group 2", "fp8 group 4 split")
FP8_COMBOS = COMBOS[2:]
#: The engine's (the 16-bit table's over bf16 and FP8 caches, the e4m3 tensor-core table's over
#: FP8; over bf16 an `fp8_mma` variant is the 16-bit kernel) and one with float16 dots over FP8
#: (`PEGBOARD_FP8_F16_DOT=1`, `to_dot_dtype`'s clamp), bf16 and FP8, unsplit group 2 and split
#: group 4; the baseline (no page prefetch) for the `pf` variants' buffers.
ENGINE = list(dict.fromkeys(n for _, n in (*DECODE_DEFAULTS, *FP8_MMA_DEFAULTS)))
FP8_DEFAULT = FP8_MMA_DEFAULTS[-1][1]  # (the table's smallest batches: batch 1 and up)
KERNELS = [
    *(f"{name} {combo}" for name in [*ENGINE, "s3-fast-pf-f16"] for combo in COMBOS),
    "baseline bf16 group 2",
]
#: Experimental `fp8_mma` variants the engine does not run (the tests marked `experimental`,
#: which `make test` leaves to `make test-experimental`): the first e4m3 tile (`mma8`, values
#: through ldmatrix), `v_tile` at 4 stages, `lean_addr`, and page ids copied ahead at 5 stages.
EXPERIMENTAL = [
    f"{name} {combo}"
    for name in ("mma8-bn128-s3-fast-pf", "mma8vl-bn64-s4-fast-pf", FP8_DEFAULT,
                 "mma8vl-bn64-s3-fast-pf-lean", "mma8vl-bn64-s5-fast-lean")
    for combo in FP8_COMBOS
] + ["mma8-bn128-s3-fast-pf bf16 group 2"]  # fmt: skip

#: `decode_compile.compile_decode` for each "NAME bf16|fp8 group G[ split]" on the command line
#: (`decode_compile`'s keys): one JSON object of its summaries, or the error, on stdout.
_COMPILE = """
import dataclasses, json, sys, torch
from pegboard.plugins.kernels.triton_attention.decode_compile import compile_decode
from pegboard.plugins.kernels.triton_attention.decode_configs import DECODE_VARIANTS
rows = {}
for key in sys.argv[1:]:
    name, kv, _, group, *split = key.split()
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[kv]
    try:
        c = compile_decode(DECODE_VARIANTS[name], dtype, group=int(group), split=bool(split))
        rows[key] = dataclasses.asdict(c)
    except Exception as err:
        rows[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
print(json.dumps(rows))
"""


def compile_kernels(keys: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE, *keys],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> dict:
    return compile_kernels(KERNELS)


@pytest.fixture(scope="module")
def compiled_experimental() -> dict:
    return compile_kernels(EXPERIMENTAL)


@pytest.mark.slow
def test_the_engines_decode_variants_and_f16_dots_compile_for_sm90(compiled):
    assert sorted(compiled) == sorted(KERNELS)
    errors = {k: r["error"] for k, r in compiled.items() if "error" in r}
    assert not errors
    assert all(r["shared_bytes"] <= 227 * 1024 for r in compiled.values())  # an H100/H200 SM


@pytest.mark.slow
def test_page_prefetch_gives_the_key_value_tiles_a_second_buffer(compiled):
    """Why the `pf` variants exist: without them Triton keeps one key/value tile in shared
    memory (a program waits for each tile after computing the last); with the next tile's page
    ids loaded ahead and 3 stages it keeps two (one loads while the other is computed)."""
    assert compiled["baseline bf16 group 2"]["kv_buffers"] == 1
    assert compiled["s3-fast-pf bf16 group 2"]["kv_buffers"] == 2
    assert compiled["s3-fast-pf fp8 group 4 split"]["kv_buffers"] == 2


@pytest.mark.slow
def test_the_engines_fp8_mma_variant_multiplies_e4m3_on_the_tensor_cores(compiled):
    """Over an FP8 cache the e4m3 default's SASS has FP8 wgmma (`QGMMA ... E4M3.E4M3`) and no
    16-bit MMA: no key or value is converted; over bf16 the variant is the 16-bit kernel."""
    for combo in FP8_COMBOS:
        ops = compiled[f"{FP8_DEFAULT} {combo}"]["mma"]
        assert any(op.startswith("QGMMA") and op.endswith("E4M3.E4M3") for op in ops), ops
        assert not any(op.startswith("HMMA") for op in ops), ops
    assert not any(op.startswith("QGMMA") for op in compiled[f"{FP8_DEFAULT} bf16 group 2"]["mma"])


@pytest.mark.slow
def test_the_engines_fp8_mma_variant_feeds_values_from_swizzled_shared_memory(compiled):
    """`v_tile` (the e4m3 default has it): the value tile is copied into the MMA's shared
    layout and read by the MMA from there (no `ldmatrix` into registers, which the 16-bit
    kernel's tiles need), with as many key/value buffers as pipeline stages."""
    stages = DECODE_VARIANTS[FP8_DEFAULT].num_stages
    assert compiled[f"{FP8_DEFAULT} bf16 group 2"]["ldmatrix"] > 0  # the 16-bit kernel
    for combo in FP8_COMBOS:
        assert compiled[f"{FP8_DEFAULT} {combo}"]["ldmatrix"] == 0
        assert compiled[f"{FP8_DEFAULT} {combo}"]["kv_buffers"] == stages


@pytest.mark.slow
@pytest.mark.experimental
def test_experimental_fp8_mma_variants_compile_for_sm90(compiled_experimental):
    assert sorted(compiled_experimental) == sorted(EXPERIMENTAL)
    errors = {k: r["error"] for k, r in compiled_experimental.items() if "error" in r}
    assert not errors
    assert all(r["shared_bytes"] <= 227 * 1024 for r in compiled_experimental.values())


@pytest.mark.slow
@pytest.mark.experimental
def test_the_fp8_mma_variant_multiplies_e4m3_on_the_tensor_cores(compiled_experimental):
    """The first e4m3 tile (`mma8`): over an FP8 cache its SASS has FP8 wgmma (`QGMMA ...
    E4M3.E4M3`) and no 16-bit MMA; over bf16 the variant is the 16-bit kernel."""
    compiled = compiled_experimental
    for key in ("mma8-bn128-s3-fast-pf fp8 group 2", "mma8-bn128-s3-fast-pf fp8 group 4 split"):
        ops = compiled[key]["mma"]
        assert any(op.startswith("QGMMA") and op.endswith("E4M3.E4M3") for op in ops), ops
        assert not any(op.startswith("HMMA") for op in ops), ops
    assert not any(
        op.startswith("QGMMA") for op in compiled["mma8-bn128-s3-fast-pf bf16 group 2"]["mma"]
    )


@pytest.mark.slow
@pytest.mark.experimental
def test_the_v_tile_variant_feeds_values_to_the_mma_from_swizzled_shared_memory(
    compiled_experimental,
):
    """`v_tile`: the value tile is copied into the MMA's shared layout and read by the MMA
    from there (no `ldmatrix` into registers, which the `mma8` tile needs), with as many
    buffers as the key tile."""
    compiled = compiled_experimental
    for key in ("fp8 group 2", "fp8 group 4 split"):
        assert compiled[f"mma8-bn128-s3-fast-pf {key}"]["ldmatrix"] > 0
        assert compiled[f"mma8vl-bn64-s4-fast-pf {key}"]["ldmatrix"] == 0
        assert compiled[f"mma8vl-bn64-s4-fast-pf {key}"]["kv_buffers"] == 4


@pytest.mark.slow
@pytest.mark.experimental
def test_lean_addressing_shortens_the_loop_and_s5_copies_the_page_ids_ahead(
    compiled_experimental,
):
    """`lean_addr`: fewer loop instructions than the same variant without it (no per-key
    division, modulo, sign extension or key mask); without `pf` at 5 stages the page ids
    arrive by cp.async a tile ahead (no global load in the loop) with 3 key/value buffers."""
    compiled = compiled_experimental
    for key in ("fp8 group 2", "fp8 group 4 split"):
        lean = compiled[f"mma8vl-bn64-s3-fast-pf-lean {key}"]["loop"]["instructions"]
        assert lean < compiled[f"mma8vl-bn64-s3-fast-pf {key}"]["loop"]["instructions"]
        s5 = compiled[f"mma8vl-bn64-s5-fast-lean {key}"]
        assert s5["loop"]["LDG"] == 0 and s5["loop"]["LDGSTS"] > 8 and s5["kv_buffers"] == 3
