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

from pegboard.plugins.kernels.triton_attention.decode_configs import DECODE_DEFAULTS  # noqa: E402

# The engine's, the baseline, one with float16 dots over FP8 (`to_dot_dtype`'s clamp), and one
# with e4m3 tensor-core dots (`decode_fp8mma.py`).
VARIANTS = list(
    dict.fromkeys(
        [
            "baseline",
            "s3-fast-pf",
            "s3-fast-pf-f16",
            "mma8-bn128-s3-fast-pf",
            "mma8vl-bn64-s4-fast-pf",
            "mma8vl-bn64-s3-fast-pf",
            "mma8vl-bn64-s3-fast-pf-lean",
            "mma8vl-bn64-s5-fast-lean",
            *(n for _, n in DECODE_DEFAULTS),
        ]
    )  # fmt: skip
)


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "pegboard.plugins.kernels.triton_attention.decode_compile",
         *VARIANTS, "--json"],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_engines_decode_variants_and_f16_dots_compile_for_sm90(compiled):
    assert len(compiled) == 4 * len(VARIANTS)  # bf16/fp8 x unsplit group 2/split group 4
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
def test_the_fp8_mma_variant_multiplies_e4m3_on_the_tensor_cores(compiled):
    """Over an FP8 cache its SASS has FP8 wgmma (`QGMMA ... E4M3.E4M3`) and no 16-bit MMA: no
    key or value is converted; over bf16 the variant is the 16-bit kernel."""
    for key in ("mma8-bn128-s3-fast-pf fp8 group 2", "mma8-bn128-s3-fast-pf fp8 group 4 split"):
        ops = compiled[key]["mma"]
        assert any(op.startswith("QGMMA") and op.endswith("E4M3.E4M3") for op in ops), ops
        assert not any(op.startswith("HMMA") for op in ops), ops
    assert not any(
        op.startswith("QGMMA") for op in compiled["mma8-bn128-s3-fast-pf bf16 group 2"]["mma"]
    )


@pytest.mark.slow
def test_the_v_tile_variant_feeds_values_to_the_mma_from_swizzled_shared_memory(compiled):
    """`v_tile`: the value tile is copied into the MMA's shared layout and read by the MMA
    from there (no `ldmatrix` into registers, which the `mma8` tile needs), with as many
    buffers as the key tile."""
    for key in ("fp8 group 2", "fp8 group 4 split"):
        assert compiled[f"mma8-bn128-s3-fast-pf {key}"]["ldmatrix"] > 0
        assert compiled[f"mma8vl-bn64-s4-fast-pf {key}"]["ldmatrix"] == 0
        assert compiled[f"mma8vl-bn64-s4-fast-pf {key}"]["kv_buffers"] == 4


@pytest.mark.slow
def test_lean_addressing_shortens_the_loop_and_s5_copies_the_page_ids_ahead(compiled):
    """`lean_addr`: fewer loop instructions than the same variant without it (no per-key
    division, modulo, sign extension or key mask); without `pf` at 5 stages the page ids
    arrive by cp.async a tile ahead (no global load in the loop) with 3 key/value buffers."""
    for key in ("fp8 group 2", "fp8 group 4 split"):
        lean = compiled[f"mma8vl-bn64-s3-fast-pf-lean {key}"]["loop"]["instructions"]
        assert lean < compiled[f"mma8vl-bn64-s3-fast-pf {key}"]["loop"]["instructions"]
        s5 = compiled[f"mma8vl-bn64-s5-fast-lean {key}"]
        assert s5["loop"]["LDG"] == 0 and s5["loop"]["LDGSTS"] > 8 and s5["kv_buffers"] == 3
