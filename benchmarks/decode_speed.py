"""Greedy decode speed through onnxruntime with the KV cache, for the speed table of ``quality.py``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from measure import run_function
from quantizers import ort_job, ours_job


def decode_speed(
    model_dir: Path,
    prompt: np.ndarray,
    new_tokens: int,
    session_config: dict[str, str] | None = None,
    threads: int = 0,
) -> dict[str, float]:
    """Greedy generation through onnxruntime with the KV cache: prefill once, then one token per call."""
    from optimum.adaround.custom_ops import uses_custom_domain
    from optimum.adaround.evaluation import create_session, model_feed_specs
    from optimum.adaround.graph_passes.calibration.feeds import InputKind
    from optimum.adaround.graph_passes.model_io import find_model_file

    model_file = find_model_file(model_dir)
    session = create_session(
        model_file,
        uses_custom_ops=uses_custom_domain(model_file),
        session_config=session_config,
        intra_op_threads=threads,
    )
    specs = model_feed_specs(model_file)
    past_names = [s.name for s in specs if s.kind == InputKind.PAST]
    out_names = [o.name for o in session.get_outputs()]
    present = [n.replace("past_key_values", "present") for n in past_names]
    if any(p not in out_names for p in present):
        raise RuntimeError(f"{model_file}: cannot pair past inputs with present outputs")

    def step(
        ids: np.ndarray, past: dict[str, np.ndarray], start: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        t = ids.shape[1]
        feeds: dict[str, np.ndarray] = {}
        for s in specs:
            if s.kind == InputKind.IDS:
                feeds[s.name] = ids.astype(s.dtype)
            elif s.kind == InputKind.MASK:
                feeds[s.name] = np.ones((1, start + t), s.dtype)
            elif s.kind == InputKind.POSITIONS:
                feeds[s.name] = np.arange(start, start + t, dtype=s.dtype)[None]
            else:
                feeds[s.name] = past[s.name]
        outs = session.run(["logits", *present], feeds)
        return outs[0], dict(zip(past_names, outs[1:], strict=True))

    def empty_past() -> dict[str, np.ndarray]:
        past = {}
        for s in specs:
            if s.kind == InputKind.PAST:
                dims = [
                    0 if i == s.past_seq_axis else (1 if d is None else d) for i, d in enumerate(s.past_shape)
                ]
                past[s.name] = np.zeros(dims, s.dtype)
        return past

    step(prompt[None, :8], empty_past(), 0)  # warm-up (first-run allocations, kernel selection)
    t0 = time.perf_counter()
    logits, past = step(prompt[None], empty_past(), 0)
    prefill = time.perf_counter() - t0
    token = int(logits[0, -1].argmax())
    generated = [token]
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        logits, past = step(np.asarray([[token]]), past, prompt.size + i)
        token = int(logits[0, -1].argmax())
        generated.append(token)
    decode = time.perf_counter() - t0
    return {
        "prefill_tokens": int(prompt.size),
        "prefill_seconds": prefill,
        "prefill_tokens_per_s": prompt.size / prefill,
        "new_tokens": new_tokens,
        "decode_seconds": decode,
        "decode_tokens_per_s": (new_tokens - 1) / decode,
        "first_tokens": generated[:8],
    }


def _int4_models(work: Path, fp32_dir: Path) -> tuple[list[tuple[str, Path]], list[dict[str, Any]]]:
    """onnxruntime's int4 RTN model at accuracy levels 0 and 4 (made once under ``work``)."""
    plans, failed = [], []
    for level in (0, 4):
        d = work / f"speed-ort-int4-g128-acc{level}"
        name = f"int4 MatMulNBits g128 (onnxruntime RTN), accuracy_level={level}"
        if not d.exists():
            kwargs = {
                "algo": "default",
                "bits": 4,
                "group": 128,
                "token_ids_file": None,
                "accuracy_level": level,
            }
            res = run_function(ort_job, src=str(fp32_dir), out=str(d), **kwargs)
            if not res["ok"]:
                failed.append(
                    {"model": f"int4 MatMulNBits g128 accuracy_level={level}", "error": res["error"]}
                )
                continue
        plans.append((name, d))
    return plans, failed


def _lowbit_model(
    work: Path, fp32_dir: Path, lowbit: tuple[str, Path] | None, make: bool
) -> tuple[str, Path] | None:
    """The 3-bit lowbit model of the run, or (``make``) one made with our data-free rtn."""
    if lowbit is None and make:
        d = work / "speed-ours-w3-g128-rtn-lowbit"
        res = run_function(
            ours_job,
            src=str(fp32_dir),
            out=str(d),
            method="rtn",
            scheme="w3-g128-sym",
            fmt="lowbit",
            token_ids_file=None,
        )
        lowbit = ("rtn", d) if res["ok"] else None
    return lowbit


def speed_rows(
    work: Path,
    fp32_dir: Path,
    prompt: np.ndarray,
    settings: dict[str, Any],
    lowbit: tuple[str, Path] | None,
    make_lowbit: bool,
) -> list[dict[str, Any]]:
    """The speed table: fp32, onnxruntime int4 at two accuracy levels and our 3-bit op. ``lowbit`` is
    (method, folder) of a 3-bit lowbit row of the run, if any."""
    from optimum.adaround.evaluation import model_bytes
    from optimum.adaround.graph_passes.model_io import find_model_file

    int4, out = _int4_models(work, fp32_dir)
    plans = [("fp32", fp32_dir), *int4]
    lowbit = _lowbit_model(work, fp32_dir, lowbit, make_lowbit)
    if lowbit is not None:
        plans.append((f"3-bit MatMulLowBit g128 (ours {lowbit[0]}), accuracy_level=0", lowbit[1]))
    else:
        out.append({"model": "3-bit MatMulLowBit", "error": "no 3-bit lowbit model in this run"})
    for name, d in plans:
        print(f"decode speed: {name}", file=sys.stderr, flush=True)
        try:
            r = decode_speed(d, prompt, settings["new_tokens"], threads=settings["threads"])
        except Exception as e:
            out.append({"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            continue
        out.append({**r, "model": name, "model_mb": model_bytes(find_model_file(d)) / 1e6})
    return out
