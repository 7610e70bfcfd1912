"""Perplexity of several quantized models on the same evaluation windows, with paired differences.

Two models' perplexities on a few thousand tokens can differ by chance as much as two methods do. This
scores every model on the same windows (the protocol of ``optimum.adaround.evaluation``) and reports, for
each model after the first, the mean per-token NLL difference to the first and its standard error over
windows, so "A beats B" can be read with its uncertainty.

    python benchmarks/paired_ppl.py OUT_GPTQ OUT_ADAROUND [...] --eval-tokens 32768

``--cache DIR`` keeps each model's per-window NLLs (keyed by the model file's path, size and modification
time, the token budget and the context), so comparing a new model against the same baseline scores only
the new one: on the whole evaluation split (119291 tokens) one model takes ~4 minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import numpy as np


def window_nlls(model_dir: Path, max_tokens: int, context: int) -> np.ndarray:
    """``[windows, 2]``: summed NLL and tokens scored per window."""
    from optimum.adaround.custom_ops import uses_custom_domain
    from optimum.adaround.data.text import evaluation_text, load_tokenizer, special_prefix, token_stream
    from optimum.adaround.evaluation import create_session, make_windows, model_feed_specs, window_nll
    from optimum.adaround.graph_passes.calibration.feeds import make_feeds
    from optimum.adaround.graph_passes.model_io import find_model_file

    model_file = find_model_file(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    stream = token_stream(tokenizer, [evaluation_text()])[:max_tokens]
    prefix = special_prefix(tokenizer)
    session = create_session(model_file, uses_custom_ops=uses_custom_domain(model_file))
    specs = model_feed_specs(model_file)
    out = []
    for window in make_windows(stream, context, prefix):
        (logits,) = session.run(["logits"], make_feeds(specs, window[None, :]))
        out.append(window_nll(logits[0], window, first_target=max(1, len(prefix))))
    return np.array(out, dtype=np.float64)


def cached_window_nlls(model_dir: Path, max_tokens: int, context: int, cache: Path | None) -> np.ndarray:
    """``window_nlls``, read from / written to ``cache`` when given."""
    if cache is None:
        return window_nlls(model_dir, max_tokens, context)
    from optimum.adaround.graph_passes.model_io import find_model_file

    f = Path(find_model_file(model_dir)).resolve()
    st = f.stat()
    key = f"{f}|{st.st_size}|{st.st_mtime_ns}|{max_tokens}|{context}"
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        return np.load(path)
    w = window_nlls(model_dir, max_tokens, context)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, w)
    return w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="model folders; differences are to the first")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--cache", type=Path, default=None, help="folder for per-window NLLs of scored models")
    args = p.parse_args(argv)
    base = None
    print(f"{'model':60s} {'ppl':>9s} {'dNLL/token vs first':>20s} {'+-SE':>8s}")
    for m in args.models:
        w = cached_window_nlls(m, args.eval_tokens, args.context, args.cache)
        ppl = math.exp(w[:, 0].sum() / w[:, 1].sum())
        line = f"{str(m)[-60:]:60s} {ppl:9.3f}"
        if base is None:
            base = w
        else:
            d = (w[:, 0] - base[:, 0]) / w[:, 1]
            line += f" {d.mean():+20.4f} {d.std(ddof=1) / math.sqrt(len(d)):8.4f}"
        print(line, flush=True)
    print(f"({int(base[:, 1].sum())} tokens scored in {len(base)} windows of {args.context})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
