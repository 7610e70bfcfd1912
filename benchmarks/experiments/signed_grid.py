"""Experiment: GPTQ/AdaRound on onnxruntime's signed-extreme symmetric grid instead of ours.

Our symmetric grid uses a positive scale ``absmax / 2**(b-1)``, so a block whose largest-magnitude weight is
positive clips it to ``(2**(b-1) - 1) / 2**(b-1)`` of its value. onnxruntime's RTN (and llama.cpp's Q4_0)
instead divide the *signed* extreme by ``-2**(b-1)``: the extreme lands exactly on code 0 whatever its sign
(the scale may be negative). This script swaps that grid into GPTQ (and AdaRound, which starts from GPTQ)
without changing the library, quantizes the embedded SmolLM2 at W4 sym g128 and evaluates 2048 held-out
tokens, the same protocol as benchmarks/w4-g128-focus.

    python benchmarks/experiments/signed_grid.py OUT_DIR [gptq|adaround]
"""

import sys
import time

import numpy as np

import optimum.adaround.graph_passes.rounding.gptq as gptq_module
from optimum.adaround import quantize
from optimum.adaround.data.default_model import default_onnx_dir
from optimum.adaround.evaluation import evaluate
from optimum.adaround.graph_passes.rounding import grid as grid_module


def signed_grid_params(wmin, wmax, scheme, clip=1.0):
    if not scheme.symmetric:
        return grid_module.grid_params(wmin, wmax, scheme, clip)
    wmin = np.minimum(np.asarray(wmin, np.float32), 0) * clip
    wmax = np.maximum(np.asarray(wmax, np.float32), 0) * clip
    absmax = np.maximum(-wmin, wmax)
    sign = np.where(wmax > -wmin, np.float32(-1), np.float32(1))  # the extreme lands exactly on code 0
    return (sign * absmax / np.float32(scheme.implied_zero_point)).astype(np.float32), None


def main() -> None:
    out, method = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gptq"
    gptq_module.grid_params = signed_grid_params
    t0 = time.perf_counter()
    quantize(default_onnx_dir(), out, scheme="w4-g128", method=method, progress=False, overwrite=True)
    print(f"{method}: quantized in {time.perf_counter() - t0:.0f} s")
    report = evaluate(out, max_tokens=2048, context_length=256, progress=False)
    assert report.perplexity is not None
    print(f"{method}: perplexity {report.perplexity.perplexity:.3f} on {report.perplexity.tokens} tokens")


if __name__ == "__main__":
    main()
