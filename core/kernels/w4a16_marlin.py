"""A Marlin-style W4A16 CUDA kernel, compiled at run time with NVRTC (`torch.cuda._compile_kernel`):
`y = x @ W.T` for bf16 x `[M, K]` (M <= 64) and 4-bit W in `MarlinLayout`
(`pegboard.plugins.linear.marlin_layout`, which describes the words and parameters).

How it runs (`SOURCE`):

- Computed transposed, `y.T = W @ x.T`, with `mma.sync.m16n8k16` (bf16 in, float32
  accumulators): W is the A operand and never touches shared memory. A lane's 16-byte load
  (`ld.global.nc.L1::no_allocate`) is four 16 x 16 tiles' worth of its A fragments; each word
  becomes its four fragment registers with one `lop3` each (`(w >> 4r) & 0x000F000F |
  0x43004300` = the bf16 pair `128 + q`), no float work per weight. x.T is the B operand: the
  layout deals each 64-column chunk's columns to the four tiles so that a lane's B registers
  for two tiles are 8 consecutive columns of one row of x, one 16-byte load straight from x
  (read-only, L1-cached; rows past M are zeros); one n8 tile per 8 rows of x (`token_tiles`).
- De-quantized after the dot (Marlin's post-scale, in float32): per unit of one group (or one
  step, whichever is shorter) the mma sums `d = sum (128 + q) x` and, with an all-ones A, `sx =
  sum x`; then `acc += scale * (d - 136 sx) + zero * sx`, i.e. `sum ((q - 8) scale + zero) x`
  with the layout's exact float32 scale and zero (float32 accumulation throughout).
- A block of `warps` warps owns `row_tiles` tiles of 16 output rows and splits K between its
  warps (contiguous runs of steps of `chunks` x 64 columns); each warp loads the next step's
  words and parameters while it multiplies the current one (`chunks` 16-byte loads per row
  tile in flight per lane, twice). The warps' float32 partial sums meet in shared memory and
  are added in warp order (deterministic), rounded once to bf16.
- Variants (`MarlinConfig`; measured on the H200 in session 13, docs/kernels.md): `stages`,
  each warp's words through a ring of steps in shared memory (`cp.async`, several steps in
  flight, no `next` registers);
  `x_ahead`, the next step's x loaded at once; `pdl`, programmatic dependent launch
  (`griddepcontrol.wait` after the first words and parameters are loaded, before x is read or
  anything stored; launched by `cuda_launch.launch_pdl`).
- Launched on the current stream, no host synchronisation and no workspace: CUDA-graph
  capturable. Grid: one block per `row_tiles` x 16 output rows (no split of K across blocks:
  Llama-3.1-8B's layers give 256-1792 blocks at `row_tiles` 1).

`kernel_source(...)` is the whole translation unit for one configuration (no #include: it needs
no CUDA headers, so NVRTC compiles it as it is, and `nvcc -cubin` reports its registers in the
CPU tests). The compiled functions are cached per configuration.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from pegboard.core.kernels.cuda_launch import launch_pdl
from pegboard.core.kernels.cuda_support import bf16_sm80_reason, pdl_enabled

#: The largest M (rows of x) the kernel takes: eight n8 tiles.
MAX_ROWS = 64
#: The layout's parameter dtype per `MarlinConfig.params`, and its code in the source.
PARAM_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
PARAM_KIND = {"f32": 0, "f16": 1, "bf16": 2}


@dataclass(frozen=True)
class MarlinConfig:
    """One launch configuration: `warps` per block (splitting K), `chunks` 16-byte loads per lane
    and row tile per step (64 columns of K each), `row_tiles` tiles of 16 output rows per block
    (sharing x's B fragments), the parameters' dtype (`params`: "f32", "f16" or "bf16", the
    layout's `params` dtype, `PARAM_DTYPES`), `l2_ahead` steps beyond the next whose words
    each warp asks the L2 to fetch (`prefetch.global.L2`: more bytes in flight than registers
    hold), `splits` of K across blocks (0: `auto_splits`; a launch-time choice, not
    compiled in), `stages` of each warp's words in a shared-memory ring filled by `cp.async`
    (0: the next step's words in registers; n: n - 1 steps in flight), `x_ahead` (the
    next step's x loaded with its words, all at once, instead of each 16 bytes just before its
    mma) and `pdl` (programmatic dependent launch: the prologue's loads overlap the kernel
    before)."""

    warps: int = 8
    chunks: int = 4
    row_tiles: int = 1
    params: str = "f32"
    l2_ahead: int = 0
    splits: int = 0
    stages: int = 0
    x_ahead: bool = False
    pdl: bool = False

    @property
    def name(self) -> str:
        ahead = f"-l2a{self.l2_ahead}" if self.l2_ahead else ""
        ring = f"-st{self.stages}" if self.stages else ""
        ring += "-xa" if self.x_ahead else ""
        pdl = "-pdl" if self.pdl else ""
        split = f"-s{self.splits}" if self.splits else ""
        base = f"w{self.warps}-c{self.chunks}-r{self.row_tiles}-{self.params}p"
        return f"{base}{ahead}{ring}{pdl}{split}"


C = MarlinConfig
#: Launch configurations per number of n8 tiles (`token_tiles`), in order of preference until
#: the H200 sweep (`scripts/bench_w4a16_marlin.py`) orders them; `default_config` runs the
#: first that takes the shape. Each compiles for sm_90a without spills at the groups it takes
#: (tests/test_w4a16_marlin.py); left out because they spilled: 8 chunks, more warps or longer
#: steps at 4-8 tiles. Session 13 added the word rings (`stages`), x a step ahead (`x_ahead`),
#: programmatic dependent launch (`pdl`), and two or four row tiles at 2 tiles (x read once per
#: 32-64 rows of W instead of per 16: at M = 16 a block reads 4x more bytes of x than of
#: words); their H200 figures pick `LAYER_CONFIGS` below.
CANDIDATES: dict[int, list[MarlinConfig]] = {
    1: [
        C(8, 4),
        C(4, 4),
        C(8, 2),
        C(4, 2),
        C(8, 4, 2),
        C(8, 4, params="f16"),
        C(8, 4, params="bf16"),
        C(8, 4, l2_ahead=1),
        C(8, 4, l2_ahead=2),
        C(8, 1),
        C(8, 2, stages=4),
        C(8, 2, stages=3),
        C(4, 2, stages=4),
        C(4, 2, stages=8),
        C(4, 4, stages=4),
        C(4, 1, stages=4),
        C(8, 4, pdl=True),
        C(8, 2, pdl=True),
        C(4, 2, pdl=True),
        C(8, 2, stages=4, pdl=True),
        C(4, 2, stages=4, pdl=True),
        C(8, 2, x_ahead=True),
        C(4, 2, x_ahead=True),
        C(8, 4, x_ahead=True),
        C(8, 2, stages=4, x_ahead=True),
        C(4, 2, stages=4, x_ahead=True),
        C(4, 4, stages=4, x_ahead=True),
        C(8, 2, stages=4, x_ahead=True, pdl=True),
        C(4, 2, stages=4, x_ahead=True, pdl=True),
    ],
    2: [
        C(8, 4),
        C(4, 4),
        C(8, 2),
        C(4, 2),
        C(8, 4, params="f16"),
        C(8, 4, params="bf16"),
        C(4, 4, l2_ahead=1),
        C(8, 2, l2_ahead=1),
        C(8, 1),
        C(8, 2, 2),
        C(4, 2, 2),
        C(4, 2, 2, stages=4),
        C(8, 1, 2, stages=3),
        C(4, 1, 4, stages=3),
        C(8, 2, stages=4),
        C(4, 4, stages=4),
        C(8, 2, pdl=True),
        C(4, 4, pdl=True),
        C(4, 2, 2, stages=4, pdl=True),
        C(8, 2, x_ahead=True),
        C(8, 2, stages=4, x_ahead=True),
        C(4, 2, 2, stages=4, x_ahead=True),
        C(8, 1, 2, stages=3, x_ahead=True),
        C(4, 1, 4, stages=3, x_ahead=True),
        C(4, 2, 2, stages=4, x_ahead=True, pdl=True),
    ],
    4: [C(8, 2), C(4, 2), C(8, 2, l2_ahead=1), C(8, 1), C(8, 1, x_ahead=True)],
    8: [C(8, 1), C(4, 1), C(8, 1, l2_ahead=2), C(2, 1)],
}
#: The measured best configuration per layer shape (N, K) and n8 tiles, which the `w4a16`
#: plugin runs (`layer_config`): H200, Llama-3.1-8B g128, float32 parameters. Tiles 1 (M <= 8):
#: session 13's sweep at M = 1 (docs/bench/h200-w4a16-marlin-pdl-s13.json), PDL on: the four
#: layers x 32 chained in one CUDA graph 1.54 ms vs 1.67 with session 12's configurations and
#: 1.75 with the same ones without PDL. Tiles 2 (M 9-16): session 12's, from M = 16 (there the
#: per-layer best with or without PDL chained slower, 2.64 / 2.97 ms, than these, 2.38). Tiles
#: 4 (M 17-32): session 14's sweep at M = 32 (docs/bench/h200-w4a16-marlin-m32-s14.json):
#: 136.7 us for the four layers vs 156.7 for the Triton W4A16 kernels and 126.3 for bf16.
LAYER_CONFIGS: dict[tuple[int, int], dict[int, MarlinConfig]] = {
    # qkv: 8.1 -> 7.3 us at M = 1; 10.7 at 16; 16.0 at 32
    (6144, 4096): {1: C(8, 2, stages=4, x_ahead=True, pdl=True), 2: C(4, 4), 4: C(4, 2)},
    # o: 6.2 -> 4.9 us; 7.5; 13.1
    (4096, 4096): {1: C(8, 4, pdl=True), 2: C(8, 2), 4: C(8, 2, l2_ahead=1)},
    # gate_up: 24.0 -> 23.1 us; 38.0; 74.1
    (28672, 4096): {1: C(4, 2, pdl=True), 2: C(4, 4), 4: C(4, 2)},
    # down: 15.1 -> 12.8 us; 19.6; 33.5
    (4096, 14336): {1: C(8, 4, pdl=True), 2: C(8, 2), 4: C(8, 2, l2_ahead=1)},
}
#: Other shapes: the configuration of least summed time over those four layers in the same
#: sweep (tiles 1: w8-c4, at most 1.20x a layer's best; tiles 2: w8-c2, at most 1.21x; tiles 4:
#: w4-c2, 144.7 us summed, at most 1.22x).
DEFAULT_LAYER_CONFIGS: dict[int, MarlinConfig] = {1: C(8, 4), 2: C(8, 2), 4: C(4, 2)}
del C

#: Rows of x up to which the `w4a16` plugin calls this kernel (`--w4a16-kernel marlin`; more
#: rows: pegboard's Triton kernels). In session 12's sweep it beat tinygemm and pegboard's bf16
#: kernels on all four Llama-3.1-8B layers at M = 1, 4 and 16; at M = 32 (session 14) it beat
#: the Triton W4A16 kernels by 13 % (0.92x bf16), at M = 64 it lost to them (243 vs 196 us).
PLUGIN_MAX_ROWS = 32


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run this model's layers here (None if it can): an NVIDIA GPU of
    compute capability 8.0 or more (bf16 `mma.sync`), bf16 activations, and a torch with NVRTC
    (`torch.cuda._compile_kernel`)."""
    reason = bf16_sm80_reason("the Marlin kernel", device, dtype)
    if reason is None and not hasattr(torch.cuda, "_compile_kernel"):
        reason = f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)"
    return reason


def layer_config(tiles: int, n: int, k: int, group: int) -> MarlinConfig:
    """The configuration the `w4a16` plugin runs for an `[N, K]` layer at `tiles` n8 tiles:
    the measured one for its shape (`LAYER_CONFIGS`), else `DEFAULT_LAYER_CONFIGS`, else (a
    shape or group those cannot take) `default_config`, which raises ValueError if none can."""
    rows = 8 * tiles
    for config in (LAYER_CONFIGS.get((n, k), {}).get(tiles), DEFAULT_LAYER_CONFIGS.get(tiles)):
        if config is not None and config_unsupported_reason(config, rows, n, k, group) is None:
            return config
    return default_config(rows, n, k, group)


def token_tiles(m: int) -> int:
    """n8 tiles of x.T the kernel multiplies for M rows: 1, 2, 4 or 8."""
    for tiles in (1, 2, 4, 8):
        if m <= 8 * tiles:
            return tiles
    raise ValueError(f"the Marlin kernel takes at most {MAX_ROWS} rows of x, not {m}")


def default_config(m: int, n: int, k: int, group: int) -> MarlinConfig:
    """The configuration `marlin_linear` runs for M rows of x when given none: the first of
    `CANDIDATES` that takes the shape."""
    for config in CANDIDATES[token_tiles(m)]:
        if config_unsupported_reason(config, m, n, k, group) is None:
            return config
    reasons = [config_unsupported_reason(c, m, n, k, group) for c in CANDIDATES[token_tiles(m)]]
    raise ValueError(f"no Marlin configuration takes M={m} N={n} K={k} group {group}: {reasons}")


def config_unsupported_reason(
    config: MarlinConfig, m: int, n: int, k: int, group: int
) -> str | None:
    """Why `config` cannot run this shape (None if it can): whole steps per row tile, groups
    that are whole units of a step or whole steps, whole blocks of rows, and the shared-memory
    reduction within 48 KiB."""
    step = 64 * config.chunks
    if k % step:
        return f"K={k} is not a multiple of the step ({step} columns)"
    if group % step and step % group:
        return f"group size {group} and the step of {step} columns do not divide each other"
    if step > 2 * group:  # each group's parameters are registers, twice (prefetched)
        return f"a step of {step} columns holds more than two groups of {group}"
    if n % (16 * config.row_tiles):
        return f"N={n} is not a multiple of {16 * config.row_tiles} rows"
    if m > MAX_ROWS:
        return f"M={m} is more than {MAX_ROWS} rows"
    if config.stages and not 2 <= config.stages <= 8:
        return f"a ring of {config.stages} stages (2-8 or 0, none)"
    if config.stages and config.l2_ahead:
        return "the ring's stages are the bytes in flight: no L2 prefetch beside them"
    if _reduce_bytes(config, token_tiles(m)) + _ring_bytes(config) > 48 * 1024:
        return "the warps' partial sums and word rings do not fit 48 KiB of shared memory"
    return None


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def auto_splits(blocks: int, steps: int, warps: int, multiprocessors: int) -> int:
    """Splits of K across blocks for a grid of `blocks` row blocks: 1 when they cover the
    GPU's multiprocessors, else enough for about two blocks per multiprocessor while every
    warp keeps at least one step."""
    if blocks >= multiprocessors:
        return 1
    return max(1, min(-(-2 * multiprocessors // blocks), steps // warps))


def splits(config: MarlinConfig, n: int, k: int, device: torch.device) -> int:
    """Splits of K across blocks `marlin_linear` launches for an `[N, K]` layer with `config`
    on `device` (`config.splits`, else `auto_splits`)."""
    if config.splits:
        return config.splits
    blocks = n // (16 * config.row_tiles)
    steps = k // (64 * config.chunks)
    return auto_splits(blocks, steps, config.warps, _multiprocessors(device.index or 0))


def _reduce_bytes(config: MarlinConfig, mt: int) -> int:
    return config.warps * config.row_tiles * 16 * mt * 8 * 4


def _ring_bytes(config: MarlinConfig) -> int:
    """Each warp's ring: `stages` steps of 16 bytes per lane, chunk and row tile (and 16 bytes
    of alignment and `last_block` beside it)."""
    if not config.stages:
        return 0
    return config.warps * config.stages * config.chunks * config.row_tiles * 32 * 16 + 16


def kernel_name(config: MarlinConfig, mt: int, group: int) -> str:
    compiled_as = replace(config, splits=0).name  # splits are the grid's, not the code's
    return f"w4a16_marlin_m{mt}_g{group}_{compiled_as.replace('-', '_')}"


def kernel_source(config: MarlinConfig, mt: int, group: int) -> str:
    """The CUDA source of one configuration for `mt` n8 tiles and this group size (K for
    per-channel scales)."""
    defines = {
        "KERNEL_NAME": kernel_name(config, mt, group),
        "MT": mt,
        "RT": config.row_tiles,
        "WARPS": config.warps,
        "U": config.chunks,
        "L2_AHEAD": config.l2_ahead,
        "GROUP": group,
        "PARAM_KIND": PARAM_KIND[config.params],
        "STAGES": config.stages,
        "X_AHEAD": int(config.x_ahead),
        "PDL": int(config.pdl),
    }
    return "".join(f"#define {key} {value}\n" for key, value in defines.items()) + SOURCE


SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

// 16-column tiles per step, per unit (one group or one step, whichever is shorter), units per step
#define STEP_TILES (4 * U)
#define UNIT_TILES (GROUP < 64 * U ? GROUP / 16 : STEP_TILES)
#define UNITS (STEP_TILES / UNIT_TILES)
#define ONES 0x3F803F80u  // bf16 pair (1.0, 1.0): A operand whose product is sum(x)

#if !STAGES
static __device__ __forceinline__ void load_words(const u32* p, u32 (&r)[4]) {
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}
#endif

// 8 columns of one row of x: a lane's B registers for two tiles (marlin_layout.CHUNK_COLUMN)
static __device__ __forceinline__ void load_x(const u16* p, u32 (&r)[4]) {
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

// (scale, zero) of rows g and g + 8 of one row tile and group, as float32
#if PARAM_KIND == 0
static __device__ __forceinline__ void load_params(const void* p, float (&r)[4]) {
  asm("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
      : "=f"(r[0]), "=f"(r[1]), "=f"(r[2]), "=f"(r[3]) : "l"(p));
}
#elif PARAM_KIND == 1
static __device__ __forceinline__ void load_params(const void* p, float (&r)[4]) {
  u16 h[4];
  asm("ld.global.nc.v4.u16 {%0, %1, %2, %3}, [%4];"
      : "=h"(h[0]), "=h"(h[1]), "=h"(h[2]), "=h"(h[3]) : "l"(p));
#pragma unroll
  for (int i = 0; i < 4; ++i) asm("cvt.f32.f16 %0, %1;" : "=f"(r[i]) : "h"(h[i]));
}
#else
static __device__ __forceinline__ float bits_to_float(u32 b) {
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(b));
  return f;
}

static __device__ __forceinline__ void load_params(const void* p, float (&r)[4]) {
  u32 a, b;
  asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
  r[0] = bits_to_float(a << 16);
  r[1] = bits_to_float(a & 0xFFFF0000u);
  r[2] = bits_to_float(b << 16);
  r[3] = bits_to_float(b & 0xFFFF0000u);
}
#endif

// the bf16 pair (128 + q_lo, 128 + q_hi) of the nibbles at bit 0 and bit 16 of w
static __device__ __forceinline__ u32 magic(u32 w) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "n"(0x000F000F), "n"(0x43004300));
  return r;
}

static __device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                           u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}

static __device__ __forceinline__ u16 to_bf16(float v) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
  return r;
}

#if STAGES
static __device__ __forceinline__ u32 shared_address(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// 16 bytes global -> shared, asynchronous (L2 only); visible to this lane after its group's wait
static __device__ __forceinline__ void copy_async(u32 dst, const u32* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

// volatile: not hoisted above the cp.async.wait_group that makes the words visible
static __device__ __forceinline__ void load_shared(u32 p, u32 (&r)[4]) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(p) : "memory");
}
#endif

// programmatic dependent launch: before it only weights and parameters are read, nothing is
// stored (no earlier kernel writes those); after it the kernel before has completed. x comes
// out of the wait: its loads (asm the compiler may move) depend on it
#if PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define WAIT_FOR_INPUTS()                                           \
  {                                                                 \
    asm volatile("griddepcontrol.wait;" : "+l"(x) : : "memory");    \
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); \
  }
#else
#define WAIT_FOR_INPUTS()
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32) KERNEL_NAME(
    const u32* __restrict__ qweight,  // [N / 16, K / 64, 32, 4]
    const void* __restrict__ params,  // [N / 16, K / GROUP, 8, 4] (scale, zero) x rows g, g + 8
    const u16* x,                     // [M, K] bf16 (no __restrict__: WAIT_FOR_INPUTS writes it)
    u16* __restrict__ y,              // [M, N] bf16
    float* __restrict__ partials,     // [gridDim.y, M, N] float32 (split K across blocks only)
    u32* __restrict__ counters,       // [gridDim.x] zeros: the blocks of a row tile done so far
    int M, int N, int K) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int chunks = K >> 6;
  const int steps = chunks / U;
  const int groups = K / GROUP;
  const int part = blockIdx.y * WARPS + warp, parts = gridDim.y * WARPS;  // split of K
  const int first = part * steps / parts, last = (part + 1) * steps / parts;
  const int rt0 = blockIdx.x * RT;
  const char* pbase = (const char*)params;
  const int pbytes = PARAM_KIND == 0 ? 16 : 8;

  float acc[RT][MT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][m][i] = 0.f;

#if !STAGES
  u32 next[U][RT][4];
#endif
  float pnext[UNITS][RT][4];
  // this lane's 16 bytes of chunk c of step s, row tile r
#define WORDS(s, c, r) (qweight + ((((long)(rt0 + (r)) * chunks + (s) * U + (c)) * 32 + lane) << 2))
#define FETCH_WORDS(s)                                  \
  _Pragma("unroll") for (int c = 0; c < U; ++c)         \
  _Pragma("unroll") for (int r = 0; r < RT; ++r)        \
    load_words(WORDS(s, c, r), next[c][r]);
#define FETCH_PARAMS(s)                                                         \
  _Pragma("unroll") for (int f = 0; f < UNITS; ++f) {                           \
    const int gi = ((s) * 64 * U + f * UNIT_TILES * 16) / GROUP;                \
    _Pragma("unroll") for (int r = 0; r < RT; ++r)                              \
      load_params(pbase + (((long)(rt0 + r) * groups + gi) * 8 + g) * pbytes,   \
                  pnext[f][r]);                                                 \
  }
#define FETCH(s)     \
  {                  \
    FETCH_WORDS(s)   \
    FETCH_PARAMS(s)  \
  }
  // words of step `s` into L2 only (no registers): bytes in flight beyond the next step's
#define PREFETCH_L2(s)                                                       \
  {                                                                          \
    _Pragma("unroll") for (int c = 0; c < U; ++c)                            \
    _Pragma("unroll") for (int r = 0; r < RT; ++r)                           \
      asm volatile("prefetch.global.L2 [%0];" ::"l"(WORDS(s, c, r)));        \
  }
#if STAGES
  // the warp's ring: slot (s - first) % STAGES holds step s's words, each lane its own 16
  // bytes per chunk and row tile (it reads back only what it copied: no barrier); one
  // cp.async group per step, committed even when empty, so group i is step first + i
  __shared__ __align__(16) u32 ring[WARPS][STAGES][U * RT][32][4];
  const u32 ring0 = shared_address(&ring[warp][0][0][lane][0]);
#define SLOT(slot, c, r) (ring0 + (((slot) * U * RT + (c) * RT + (r)) * 32 * 16))
#define FILL(s, slot)                                   \
  {                                                     \
    _Pragma("unroll") for (int c = 0; c < U; ++c)       \
    _Pragma("unroll") for (int r = 0; r < RT; ++r)      \
      copy_async(SLOT(slot, c, r), WORDS(s, c, r));     \
  }
#pragma unroll
  for (int a = 0; a < STAGES - 1; ++a) {
    if (first + a < last) FILL(first + a, a)
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  if (first < last) FETCH_PARAMS(first)
#else
  if (first < last) FETCH(first)
#pragma unroll
  for (int a = 1; a <= L2_AHEAD; ++a)
    if (first + a < last) PREFETCH_L2(first + a)
#endif
  WAIT_FOR_INPUTS()
#if X_AHEAD
  // x of step s: 16 bytes per chunk, half (tiles 2h, 2h + 1) and n8 tile; rows past M zeros
  u32 xnext[U][2][MT][4];
#define FETCH_X(s)                                                                      \
  _Pragma("unroll") for (int c = 0; c < U; ++c)                                         \
  _Pragma("unroll") for (int h = 0; h < 2; ++h)                                         \
  _Pragma("unroll") for (int m = 0; m < MT; ++m) {                                      \
    _Pragma("unroll") for (int i = 0; i < 4; ++i) xnext[c][h][m][i] = 0u;               \
    if (m * 8 + g < M)                                                                  \
      load_x(x + (long)(m * 8 + g) * K + ((s) * U + c) * 64 + 32 * h + 8 * t, xnext[c][h][m]); \
  }
  if (first < last) FETCH_X(first)
#endif

  for (int s = first; s < last; ++s) {
    u32 cur[U][RT][4];
    float pcur[UNITS][RT][4];
#if X_AHEAD
    u32 xcur[U][2][MT][4];
#pragma unroll
    for (int c = 0; c < U; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int i = 0; i < 4; ++i) xcur[c][h][m][i] = xnext[c][h][m][i];
    if (s + 1 < last) FETCH_X(s + 1)
#endif
#if STAGES
    // groups committed: STAGES - 1 + (s - first); step s's is complete once at most the
    // STAGES - 2 after it are pending
    const int slot = (s - first) % STAGES;
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2) : "memory");
#pragma unroll
    for (int c = 0; c < U; ++c)
#pragma unroll
      for (int r = 0; r < RT; ++r) load_shared(SLOT(slot, c, r), cur[c][r]);
    // into the slot step s - 1 left (read into registers by the iteration before)
    if (s + STAGES - 1 < last) FILL(s + STAGES - 1, (slot + STAGES - 1) % STAGES)
    asm volatile("cp.async.commit_group;" ::: "memory");
#pragma unroll
    for (int f = 0; f < UNITS; ++f)
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int i = 0; i < 4; ++i) pcur[f][r][i] = pnext[f][r][i];
    if (s + 1 < last) FETCH_PARAMS(s + 1)
#else
#pragma unroll
    for (int c = 0; c < U; ++c)
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int i = 0; i < 4; ++i) cur[c][r][i] = next[c][r][i];
#pragma unroll
    for (int f = 0; f < UNITS; ++f)
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int i = 0; i < 4; ++i) pcur[f][r][i] = pnext[f][r][i];
    if (s + 1 < last) FETCH(s + 1)
    if (L2_AHEAD > 0 && s + 1 + L2_AHEAD < last) PREFETCH_L2(s + 1 + L2_AHEAD)
#endif

#pragma unroll
    for (int f = 0; f < UNITS; ++f) {
      float d[RT][MT][4], sx[MT][4];
      u32 xv[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sx[m][i] = 0.f;
#pragma unroll
          for (int r = 0; r < RT; ++r) d[r][m][i] = 0.f;
        }
#pragma unroll
      for (int u = 0; u < UNIT_TILES; ++u) {
        const int tile = u + f * UNIT_TILES;  // mma tile within the step
        const int c = tile >> 2, j = tile & 3;
        if ((j & 1) == 0) {  // tiles 2h, 2h + 1 of a chunk: columns 32h + 8t .. + 7 of x
#pragma unroll
          for (int m = 0; m < MT; ++m) {
#if X_AHEAD
#pragma unroll
            for (int i = 0; i < 4; ++i) xv[m][i] = xcur[c][j >> 1][m][i];
#else
            const int row = m * 8 + g;  // this lane's row of x for the B fragment
#pragma unroll
            for (int i = 0; i < 4; ++i) xv[m][i] = 0u;
            if (row < M) load_x(x + (long)row * K + (s * U + c) * 64 + 32 * (j >> 1) + 8 * t, xv[m]);
#endif
          }
        }
        u32 b[MT][2];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          b[m][0] = xv[m][2 * (j & 1)];
          b[m][1] = xv[m][2 * (j & 1) + 1];
          mma(sx[m], ONES, ONES, ONES, ONES, b[m][0], b[m][1]);
        }
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const u32 w = cur[c][r][j];
          const u32 a0 = magic(w), a1 = magic(w >> 4), a2 = magic(w >> 8), a3 = magic(w >> 12);
#pragma unroll
          for (int m = 0; m < MT; ++m) mma(d[r][m], a0, a1, a2, a3, b[m][0], b[m][1]);
        }
      }
      // acc += scale * (d - 136 sx) + zero * sx: c0, c1 are row g, c2, c3 row g + 8
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float scale = pcur[f][r][i < 2 ? 0 : 2], zero = pcur[f][r][i < 2 ? 1 : 3];
            const float centred = fma_rn(-136.f, sx[m][i], d[r][m][i]);
            acc[r][m][i] = fma_rn(scale, centred, fma_rn(zero, sx[m][i], acc[r][m][i]));
          }
    }
  }

  // the block's sums: C fragment element i of lane (g, t) is row g (+ 8 for i >= 2), column
  // 2t + (i & 1); the warps' partial sums added in warp order
  __shared__ float partial[WARPS][RT * 16][MT * 8];
  __shared__ int last_block;
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        partial[warp][r * 16 + g + 8 * (i >> 1)][m * 8 + 2 * t + (i & 1)] = acc[r][m][i];
  __syncthreads();
  const int splits = gridDim.y;
  for (int e = threadIdx.x; e < RT * 16 * MT * 8; e += WARPS * 32) {
    const int col = e / (RT * 16), row = e % (RT * 16);
    if (col < M) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) v += partial[w][row][col];
      if (splits == 1) y[(long)col * N + rt0 * 16 + row] = to_bf16(v);
      else partials[((long)blockIdx.y * M + col) * N + rt0 * 16 + row] = v;
    }
  }
  if (splits == 1) return;
  // split K across blocks: the last of the row tile's blocks to arrive adds the float32 sums
  // in split order (deterministic) and re-arms the counter for the next launch
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) {
    u32 old;
    asm volatile("atom.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counters + blockIdx.x) : "memory");
    last_block = old == (u32)(splits - 1);
  }
  __syncthreads();
  if (!last_block) return;
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  for (int e = threadIdx.x; e < RT * 16 * MT * 8; e += WARPS * 32) {
    const int col = e / (RT * 16), row = e % (RT * 16);
    if (col < M) {
      float v = 0.f;
      for (int sp = 0; sp < splits; ++sp) {
        float p;
        asm volatile("ld.global.cg.f32 %0, [%1];"
                     : "=f"(p) : "l"(partials + ((long)sp * M + col) * N + rt0 * 16 + row) : "memory");
        v += p;
      }
      y[(long)col * N + rt0 * 16 + row] = to_bf16(v);
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0u;
}
"""


class CompileError(RuntimeError):
    """NVRTC rejected the kernel's source; the message holds the compiler's log."""


def compiled(config: MarlinConfig, mt: int, group: int):
    """The NVRTC-compiled kernel for one configuration (cached, a failure too: `auto` tries
    it for every layer of a model; `splits` aside)."""
    kernel = _compiled(replace(config, splits=0), mt, group)
    if isinstance(kernel, CompileError):  # (a new one each time: tracebacks do not pile up)
        raise CompileError(*kernel.args)
    return kernel


@functools.cache
def _compiled(config: MarlinConfig, mt: int, group: int):
    source = kernel_source(config, mt, group)
    try:
        return torch.cuda._compile_kernel(source, kernel_name(config, mt, group))
    except (RuntimeError, OSError) as e:  # OSError: torch found no CUDA_HOME for the headers
        return CompileError(f"{kernel_name(config, mt, group)}: {e}")


def marlin_linear(
    x: torch.Tensor,
    layout,
    config: MarlinConfig | None = None,
    partials: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T` for W in `MarlinLayout`: x `[..., K]` bf16 on CUDA (at most `MAX_ROWS` rows),
    a new `[..., N]` bf16 tensor. Launched on the current stream (capturable in a CUDA graph).
    Where K is split across blocks (`splits` > 1), `partials` (float32, at least splits x rows
    x N elements, e.g. allocated once per layer) holds the sums per split; without it they
    come from the allocator."""
    rows = x.numel() // x.shape[-1]
    n, k = layout.n, layout.k
    if rows == 0:
        return x.new_empty(*x.shape[:-1], n)
    config = config or default_config(rows, n, k, layout.group_size)
    reason = config_unsupported_reason(config, rows, n, k, layout.group_size)
    if reason:
        raise ValueError(f"Marlin kernel {config.name}: {reason}")
    want = PARAM_DTYPES[config.params]
    if layout.params.dtype != want:
        raise ValueError(
            f"{config.name} reads {want} parameters, the layout has {layout.params.dtype}"
        )
    x2 = x.reshape(rows, k).contiguous()
    if x2.data_ptr() % 16:  # x is read in 16-byte words
        x2 = x2.clone()
    y = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
    blocks = n // (16 * config.row_tiles)
    split = splits(config, n, k, x.device)
    if split == 1:
        partials = y  # unused with one split
    elif partials is None:  # from the allocator: capturable
        partials = torch.empty(split, rows, n, device=x.device)
    elif partials.dtype != torch.float32 or partials.numel() < split * rows * n:
        raise ValueError(f"{config.name}: partials for {split} splits x {rows} x {n} floats")
    kernel = compiled(config, token_tiles(rows), layout.group_size)
    grid, block = (blocks, split, 1), (32 * config.warps, 1, 1)
    args = [layout.qweight, layout.params, x2, y, partials, layout.counters, rows, n, k]
    if config.pdl and pdl_enabled(x.device):
        launch_pdl(kernel, grid, block, args)
    else:  # (a `pdl` kernel launched plainly: its griddepcontrol.wait returns at once)
        kernel(grid=grid, block=block, args=args)
    return y.reshape(*x.shape[:-1], n)
