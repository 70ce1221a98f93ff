"""Launch variants of the paged decode kernel, and which one the engine runs.

A `DecodeConfig` fixes everything about a decode launch that does not change its result: the
tile of keys per iteration, warps and pipeline stages, how many KV heads one program serves,
the grid's order, whether the next tile's page ids are loaded a tile ahead, and how finely a
request's keys are split. `DECODE_VARIANTS` names the ones `scripts/bench_decode_attention.py
--sweep` compares (every one is checked against the torch reference by the tests), and
`DECODE_DEFAULTS` says which the engine runs for a batch of a given size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: At most this many splits per request (the CUDA graphs' workspace is sized by it).
MAX_SPLITS = 16


@dataclass(frozen=True)
class DecodeConfig:
    """One launch variant of `_decode_kernel` (see docs/kernels.md, "Decode variants").

    - `block_n`: keys per tile (halved, at most 32, for head sizes above 128);
    - `num_warps`, `num_stages`: Triton's; with `num_stages=2` Triton's pipeliner leaves the
      key/value loads, whose addresses come from the page-table load of the same tile, in
      place (two dependent memory latencies per tile); 3 and more pipeline them;
    - `heads_per_program`: KV heads one program serves (0: all of them). Above 1 the program
      loads each token's keys of its heads as one contiguous row (`heads * head_dim`) and
      runs one dot over them with the query rows placed block-diagonally (each query row
      non-zero only in its KV head's columns), so the tensor-core work per key equals the
      one-head program's and the bytes per load grow. With `fp8_mma` and `v_tile` (or NHD
      values) the e4m3 kernel stacks the heads' keys on the MMA's M side instead (`hp` x
      `block_n` rows, each query column's logits masked to its own head's keys);
    - `head_fastest`: grid `(head blocks, requests, splits)` instead of `(requests, head
      blocks, splits)`, so the programs reading the same pages (one request's KV heads) run
      at the same time;
    - `prefetch_pages`: load the next tile's page ids while this tile's keys arrive, which
      takes the page-table load off the key/value loads' critical path;
    - `min_chunk`: with splits, each split covers at least this many keys (a multiple of
      `block_n`; 0: `ceil(seq_len / num_splits)`), so a short request uses few splits and a
      long one many: programs of even length over uneven requests;
    - `split_cap`: at most this many splits (with `min_chunk`, how far it may split);
    - `f16_dot`: over an FP8 cache, run the dots in float16 (True: e4m3 converts to float16 in
      one instruction per pair) or in the query's dtype (False); None: `FP8_F16_DOT`. No
      effect on a 16-bit cache;
    - `asm_cvt`: with float16 dots over an FP8 cache, convert each key/value tile to float16
      right after its load with inline PTX (`decode.e4m3_to_f16`), so the dots' operands are
      16-bit tiles (`ldmatrix`) rather than bytes gathered one at a time;
    - `fixup`: with splits, the last split of a (request, KV heads) to finish (a counter per
      pair in the workspace, reset by it) merges them, instead of a second launch of the reduce
      kernel (the same merge code, so the same bits);
    - `pdl`: launch with programmatic dependent launch on Hopper (`core/kernels/pdl.py`): the
      kernel is scheduled while rope finishes, and the o projection's GEMV after it issues its
      first weight loads while attention runs.
    - `fp8_mma`: over an FP8 cache, both products in e4m3 on the tensor cores (the query and
      the probabilities quantized, `decode_fp8mma.py`), no conversion of keys or values; one
      KV head per program. Fast only over a pool that stores values transposed per page
      (`KVPool.v_layout == "hdp"`). No effect on a 16-bit cache (the other fields apply).
    - `v_tile`: with `fp8_mma` over transposed values, load each value tile as one
      `[head_dim, block_n]` tile (16-byte runs, one per page and head dimension) that the
      second MMA reads from shared memory in its swizzled layout, instead of a
      `[head_dim, pages, page_size]` tile through an unswizzled buffer and registers
      (docs/kernels.md, "FP8 tensor-core decode").
    - `row_sum_once`: with `fp8_mma`, keep the softmax's running sums per key slot of the
      tile and add them up once after the loop, instead of a sum over the tile's keys per
      tile (keys lie across the warps: a round through shared memory and a barrier each).
    - `lean_addr`: with `fp8_mma` and a page size dividing `block_n`, the keys' page indices
      and offsets in the page from the tile's first key (a multiple of the page size) plus
      constants, and the page ids zero-extended: no signed division, modulo or sign extension
      per key.
    - `streams`: with `fp8_mma`, online softmaxes per program (1 or 2). With 2 a program
      walks its keys two tiles per iteration, tile 2i into one running max / sums /
      accumulator and tile 2i + 1 into another, merged by log-sum-exp after the loop: two
      independent dependent chains in flight per program (docs/kernels.md, "Two softmax
      streams per program"). No effect on the 16-bit kernel.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    heads_per_program: int = 1
    head_fastest: bool = False
    prefetch_pages: bool = False
    min_chunk: int = 0
    split_cap: int = MAX_SPLITS
    f16_dot: bool | None = None
    asm_cvt: bool = False
    fixup: bool = False
    pdl: bool = False
    fp8_mma: bool = False
    v_tile: bool = False
    row_sum_once: bool = False
    lean_addr: bool = False
    streams: int = 1

    def __post_init__(self) -> None:
        if self.streams not in (1, 2):
            raise ValueError(f"streams {self.streams}: 1 or 2")
        if self.min_chunk % self.block_n:
            raise ValueError(f"min_chunk {self.min_chunk} is not a multiple of {self.block_n}")


_S3 = {"num_stages": 3}
_FAST = {"head_fastest": True}
_PF = {"prefetch_pages": True}
_CHUNK = {"min_chunk": 256, "split_cap": 4}
_CVT = {"f16_dot": True, "asm_cvt": True}
_MMA8V = {"fp8_mma": True, "v_tile": True}
_MMA8VL = {**_MMA8V, "row_sum_once": True}
_LEAN = {"lean_addr": True}
_X2 = {"streams": 2}

#: Every variant the sweep times: the baseline (the kernel as it was before variants
#: existed), the likeliest winners, then one knob at a time. Names: `s` stages, `w` warps,
#: `bn` keys per tile, `hp` KV heads per program (`hpall`: all), `fast` head-fastest grid,
#: `pf` page prefetch, `chunk` splits of at least 256 keys (at most 4), `f16` float16 dots over
#: an FP8 cache, `cvt` those with each tile converted to float16 after its load (`asm_cvt`).
#: What compiling for sm_90 shows (Triton 3.9, no GPU needed): without `pf` the key/value
#: tiles get one shared-memory buffer whatever `num_stages` (the page-id load takes a stage),
#: so a program waits for each tile's loads after computing the last; with `pf` and 3 (4)
#: stages they get 2 (3) buffers: one (two) tiles load while one is computed.
DECODE_VARIANTS: dict[str, DecodeConfig] = {
    "baseline": DecodeConfig(),
    "s3-fast-pf": DecodeConfig(**_S3, **_FAST, **_PF),
    "s4-pf": DecodeConfig(num_stages=4, **_PF),
    "s3-pf": DecodeConfig(**_S3, **_PF),
    "s4-fast-pf": DecodeConfig(num_stages=4, **_FAST, **_PF),
    "bn32-s4-fast-pf": DecodeConfig(block_n=32, num_stages=4, **_FAST, **_PF),
    "s3-w8-fast-pf": DecodeConfig(num_warps=8, **_S3, **_FAST, **_PF),
    "s3-fast-pf-chunk": DecodeConfig(**_S3, **_FAST, **_CHUNK, **_PF),
    "s3-fast-pf-f16": DecodeConfig(**_S3, **_FAST, **_PF, f16_dot=True),
    "s3-w8-fast-pf-f16": DecodeConfig(num_warps=8, **_S3, **_FAST, **_PF, f16_dot=True),
    "s3-fast-pf-cvt": DecodeConfig(**_S3, **_FAST, **_PF, **_CVT),
    "s4-fast-pf-cvt": DecodeConfig(num_stages=4, **_FAST, **_PF, **_CVT),
    "s3-w8-fast-pf-cvt": DecodeConfig(num_warps=8, **_S3, **_FAST, **_PF, **_CVT),
    # FP8 reads half the bytes per tile at the same latency: more keys or more programs in flight
    "bn128-w8-s3-fast-pf-f16": DecodeConfig(
        block_n=128, num_warps=8, **_S3, **_FAST, **_PF, f16_dot=True
    ),
    "s4-fast-pf-f16": DecodeConfig(num_stages=4, **_FAST, **_PF, f16_dot=True),
    "s3-fast-pf-chunk-f16": DecodeConfig(**_S3, **_FAST, **_CHUNK, **_PF, f16_dot=True),
    "hp2-s3-fast-pf-f16": DecodeConfig(heads_per_program=2, **_S3, **_FAST, **_PF, f16_dot=True),
    "hp2-s3-fast-pf": DecodeConfig(heads_per_program=2, **_S3, **_FAST, **_PF),
    "hpall-bn16-w8-s3-pf": DecodeConfig(
        block_n=16, num_warps=8, num_stages=3, heads_per_program=0, **_PF
    ),
    # e4m3 x e4m3 tensor-core dots (`fp8_mma`): sm_90 SASS has QGMMA in the loop, 1.9-2.8
    # instructions per KV element at 128 keys (docs/kernels.md, "FP8 tensor-core decode")
    "mma8-bn128-s3-fast-pf": DecodeConfig(block_n=128, **_S3, **_FAST, **_PF, fp8_mma=True),
    "mma8-bn128-s4-fast-pf": DecodeConfig(block_n=128, num_stages=4, **_FAST, **_PF, fp8_mma=True),
    "mma8-bn64-s4-fast-pf": DecodeConfig(num_stages=4, **_FAST, **_PF, fp8_mma=True),
    "mma8-bn256-s2-fast-pf": DecodeConfig(block_n=256, **_FAST, **_PF, fp8_mma=True),
    # the same with the value tile loaded as one [head_dim, block_n] tile (`v_tile`): 16-byte
    # copies into the MMA's swizzled shared layout, read by the MMA from there (the `mma8`
    # tile goes through an unswizzled buffer with bank-conflicted copies, then ldmatrix)
    "mma8v-bn64-s4-fast-pf": DecodeConfig(num_stages=4, **_FAST, **_PF, **_MMA8V),
    "mma8v-bn128-s3-fast-pf": DecodeConfig(block_n=128, **_S3, **_FAST, **_PF, **_MMA8V),
    "mma8v-bn64-s3-fast-pf": DecodeConfig(**_S3, **_FAST, **_PF, **_MMA8V),
    # and the softmax's row sums added up once after the loop, not across warps per tile
    "mma8vl-bn64-s4-fast-pf": DecodeConfig(
        num_stages=4, **_FAST, **_PF, **_MMA8V, row_sum_once=True
    ),
    "mma8vl-bn64-s3-fast-pf": DecodeConfig(**_S3, **_FAST, **_PF, **_MMA8V, row_sum_once=True),
    # (one value tile in flight but 36 KB of shared memory and 72 registers: 6 programs per SM)
    "mma8vl-bn64-s2-fast-pf": DecodeConfig(**_FAST, **_PF, **_MMA8V, row_sum_once=True),
    "mma8vl-bn128-s3-fast-pf": DecodeConfig(
        block_n=128, **_S3, **_FAST, **_PF, **_MMA8V, row_sum_once=True
    ),
    # with the keys' page indices and offsets from the tile's first key (`lean`: no division,
    # modulo or sign extension per key; 2.4 instead of 2.9 loop instructions per KV element)
    "mma8vl-bn64-s3-fast-pf-lean": DecodeConfig(**_S3, **_FAST, **_PF, **_MMA8VL, **_LEAN),
    "mma8vl-bn64-s2-fast-pf-lean": DecodeConfig(**_FAST, **_PF, **_MMA8VL, **_LEAN),
    "mma8vl-bn64-s4-fast-pf-lean": DecodeConfig(num_stages=4, **_FAST, **_PF, **_MMA8VL, **_LEAN),
    # without `pf` the pipeliner copies the page ids (cp.async) a tile before the copies that
    # need them (with `pf` they are loaded and used in one iteration: a global-memory latency
    # per tile); 5 stages keep 3 key/value buffers, as s3 with `pf` does
    "mma8vl-bn64-s5-fast-lean": DecodeConfig(num_stages=5, **_FAST, **_MMA8VL, **_LEAN),
    # 128 keys per tile, 32 KB of e4m3 KV as bf16's `s3-fast-pf` moves per tile (3 programs
    # per SM, one tile in flight each): 1.75 loop instructions per KV element
    "mma8vl-bn128-s2-fast-pf-lean": DecodeConfig(block_n=128, **_FAST, **_PF, **_MMA8VL, **_LEAN),
    # two KV heads per program (`hp2`): 128 key rows per tile, each token's keys of both heads
    # one 256-byte run as in bf16's tiles (a logit of the other head's keys is masked)
    "mma8vl-hp2-bn64-s2-fast-pf-lean": DecodeConfig(
        heads_per_program=2, **_FAST, **_PF, **_MMA8VL, **_LEAN
    ),
    "mma8vl-hp2-bn64-s4-fast-lean": DecodeConfig(
        heads_per_program=2, num_stages=4, **_FAST, **_MMA8VL, **_LEAN
    ),
    # (64 rows: the default's tile, registers and shared memory, 256-byte runs per token)
    "mma8vl-hp2-bn32-s3-fast-pf-lean": DecodeConfig(
        heads_per_program=2, block_n=32, **_S3, **_FAST, **_PF, **_MMA8VL, **_LEAN
    ),
    # (8 warps: two warpgroups of 64 keys each, 24 warps per SM instead of 12)
    "mma8vl-bn128-w8-s2-fast-pf-lean": DecodeConfig(
        block_n=128, num_warps=8, **_FAST, **_PF, **_MMA8VL, **_LEAN
    ),
    "mma8vl-bn128-s4-fast-lean": DecodeConfig(
        block_n=128, num_stages=4, **_FAST, **_MMA8VL, **_LEAN
    ),
    # two online softmaxes per program (`x2`: tiles 2i and 2i + 1 in separate running max /
    # sums / accumulators, merged after the loop): two dependent chains in flight per program;
    # bn32-x2 keeps the default's 64 keys (and shared memory) per iteration
    "mma8vl-bn64-s3-fast-pf-x2": DecodeConfig(**_S3, **_FAST, **_PF, **_MMA8VL, **_X2),
    "mma8vl-bn64-s2-fast-pf-x2": DecodeConfig(**_FAST, **_PF, **_MMA8VL, **_X2),
    "mma8vl-bn32-s3-fast-pf-x2": DecodeConfig(block_n=32, **_S3, **_FAST, **_PF, **_MMA8VL, **_X2),
    "mma8vl-bn64-s2-fast-pf-lean-x2": DecodeConfig(**_FAST, **_PF, **_MMA8VL, **_LEAN, **_X2),
    "s3": DecodeConfig(**_S3),
    "s4": DecodeConfig(num_stages=4),
    "fast": DecodeConfig(**_FAST),
    "pf": DecodeConfig(**_PF),
    "chunk": DecodeConfig(**_CHUNK),
    "f16": DecodeConfig(f16_dot=True),
    "s3-fast": DecodeConfig(**_S3, **_FAST),
    "s3-w8": DecodeConfig(num_warps=8, **_S3),
    "bn32-s4": DecodeConfig(block_n=32, num_stages=4),
    "bn128-w8": DecodeConfig(block_n=128, num_warps=8),
    "bn128-w8-s3-pf": DecodeConfig(block_n=128, num_warps=8, **_S3, **_PF),
    "hp2-s3": DecodeConfig(heads_per_program=2, **_S3),
    "hp4-bn32-w8": DecodeConfig(block_n=32, num_warps=8, heads_per_program=4),
    "hpall-bn16-w4": DecodeConfig(block_n=16, heads_per_program=0),
    "hpall-bn16-w8-chunk": DecodeConfig(block_n=16, num_warps=8, heads_per_program=0, **_CHUNK),
    # batch 1 (issue 17): no reduce launch, and PDL on top
    "s3-pf-fix": DecodeConfig(**_S3, **_PF, fixup=True),
    "s3-pf-fix-pdl": DecodeConfig(**_S3, **_PF, fixup=True, pdl=True),
}

#: The variant the engine runs for a decode batch: the first `(fewest requests, name)` pair
#: whose bound the batch reaches. Set from `bash scripts/device-run.sh decode-sweep`.
DECODE_DEFAULTS: tuple[tuple[int, str], ...] = ((32, "s3-fast-pf"), (0, "s3-pf"))
#: The same over an FP8 pool with values transposed per page (`--kv-cache-layout hdp`, the e4m3
#: tensor-core kernel): the fastest on the H200's nano-vllm decode batch (2026-12-01, session 11:
#: 114.9 µs, 2.86 TB/s; mma8vl-bn64-s4 118.1, -s2 119.0, mma8v-bn64-s4 126.1, the first
#: mma8-bn64-s4 148.1; bf16 `s3-fast-pf` 168.1); `PEGBOARD_FP8_MMA_DEFAULTS` overrides it as
#: `PEGBOARD_DECODE_DEFAULTS` does the other.
FP8_MMA_DEFAULTS: tuple[tuple[int, str], ...] = ((0, "mma8vl-bn64-s3-fast-pf"),)


def _defaults_from_env(
    text: str, var: str = "PEGBOARD_DECODE_DEFAULTS"
) -> tuple[tuple[int, str], ...]:
    """`PEGBOARD_DECODE_DEFAULTS` ("32:s3-fast-pf,0:s4-pf", or one name for every batch):
    the same table without an edit, for A/B runs on the GPU."""
    pairs = []
    for item in text.split(","):
        fewest, _, name = item.strip().rpartition(":")
        if name not in DECODE_VARIANTS:
            raise ValueError(
                f"{var}: unknown decode variant {name!r}; known: {', '.join(DECODE_VARIANTS)}"
            )
        pairs.append((int(fewest or 0), name))
    return tuple(sorted(pairs, reverse=True))


if os.environ.get("PEGBOARD_DECODE_DEFAULTS"):
    DECODE_DEFAULTS = _defaults_from_env(os.environ["PEGBOARD_DECODE_DEFAULTS"])
if os.environ.get("PEGBOARD_FP8_MMA_DEFAULTS"):
    FP8_MMA_DEFAULTS = _defaults_from_env(
        os.environ["PEGBOARD_FP8_MMA_DEFAULTS"], "PEGBOARD_FP8_MMA_DEFAULTS"
    )


def decode_config(num_requests: int, e4m3_dots: bool = False) -> DecodeConfig:
    """The variant `DECODE_DEFAULTS` (`FP8_MMA_DEFAULTS` for the e4m3 tensor-core kernel) picks
    for a decode batch of `num_requests` requests."""
    table = FP8_MMA_DEFAULTS if e4m3_dots else DECODE_DEFAULTS
    for fewest, name in table:
        if num_requests >= fewest:
            return DECODE_VARIANTS[name]
    return DECODE_VARIANTS[table[-1][1]]


def heads_per_program(config: DecodeConfig, num_kv_heads: int, block_d: int) -> int:
    """KV heads one program serves: the config's (0: all), lowered to a power of two that
    divides `num_kv_heads` and whose keys fit a row of at most 1024 elements."""
    hp = min(config.heads_per_program or num_kv_heads, num_kv_heads)
    hp = 1 << (hp.bit_length() - 1)  # a power of two: the key row is a `tl.arange`
    while hp > 1 and (num_kv_heads % hp or hp * block_d > 1024):
        hp //= 2
    return hp
