#!/usr/bin/env bash
# Build the wheel folders the PD device jobs carry (docs/benchmarks.md, "PD disaggregation"):
# .whl/pd-mooncake and .whl/pd-nixl, each = the server wheels of ../shared/tools/gpu-wheels.sh
# (less FlashInfer and tvm-ffi, which PD runs do not load) + one cuda13 transfer wheel slimmed by
# scripts/slim_wheel.py. Mooncake's and NIXL's cuda13 wheels (~50 / ~59 MB) do not fit one device
# call together (64 MiB in all); slimmed they are ~9.5 / ~29 MB.
# Usage (repo root, after ../shared/tools/gpu-wheels.sh filled .whl/):  bash scripts/pd_wheels.sh
# Then:  run(kind="nvidia-h200-x2", carry=[".whl/pd-nixl"],
#            command="WHEELS=.whl/pd-nixl bash scripts/device-run.sh pd-nixl")
set -eu
cd "$(git rev-parse --show-toplevel)"
ls .whl/fastapi-*.whl >/dev/null || { echo "run ../shared/tools/gpu-wheels.sh first" >&2; exit 1; }
dl=${PD_WHEEL_CACHE:-/tmp/pd-wheels}
mkdir -p "$dl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dl" mooncake-transfer-engine-cuda13==0.3.14 nixl-cu13==1.5.1
for b in mooncake nixl; do
  rm -rf ".whl/pd-$b" && mkdir -p ".whl/pd-$b"
  for w in .whl/*.whl; do
    case $(basename "$w") in flashinfer_python-*|apache_tvm_ffi-*) ;; *) cp "$w" ".whl/pd-$b/" ;; esac
  done
done
python3 scripts/slim_wheel.py "$dl"/mooncake_transfer_engine_cuda13-0.3.14-*.whl .whl/pd-mooncake/
python3 scripts/slim_wheel.py "$dl"/nixl_cu13-1.5.1-*.whl .whl/pd-nixl/
du -sh .whl/pd-mooncake .whl/pd-nixl
