"""benchmarks/holdout_proxy.py (a script, imported by path): in-sample vs held-out scoring and its table."""

from __future__ import annotations

import numpy as np

from optimum.adaround.graph_passes.rounding.base import SiteStats


def _draw(rng, mix, n=1024):
    x = rng.standard_normal((n, mix.shape[0])) @ mix
    return SiteStats((x.T @ x).astype(np.float32), n)


def test_gptq_beats_rtn_in_sample_and_on_a_second_draw(holdout_proxy):
    rng = np.random.default_rng(0)
    sites_a, sites_b = {}, {}
    for name in ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"):
        mix = rng.standard_normal((128, 128)) / 8 + np.eye(128)  # correlated inputs, as in LLM layers
        w = rng.standard_normal((16, 128)).astype(np.float32)
        sites_a[name] = (w, _draw(rng, mix))
        sites_b[name] = (w, _draw(rng, mix))
    methods = holdout_proxy._method_specs(["rtn", "gptq"])
    rows = holdout_proxy.score_sites(sites_a, sites_b, methods, "w4-g32-sym", log=False)
    assert [(r["method"], r["site"]) for r in rows] == [
        (m, s) for m in ("rtn", "gptq") for s in sorted(sites_a)
    ]
    by = {(r["method"], r["site"]): r for r in rows}
    for site in sites_a:
        for key in ("loss_a", "loss_b"):
            assert by["gptq", site][key] < 0.8 * by["rtn", site][key]
    table = holdout_proxy.summary(rows, "rtn")
    assert table[2].startswith("| `gptq` | 2 | ") and table[2].endswith(" | 2 |")
    assert [line.split(" | ")[0] for line in table[3:]] == ["| &nbsp;&nbsp;q_proj", "| &nbsp;&nbsp;down_proj"]


def test_method_specs_take_labels_and_json_options(holdout_proxy):
    specs = holdout_proxy._method_specs(["gptq", "adaround:iters=50", "nr=adaround:final_refit=none,lam=1.5"])
    assert specs == {
        "gptq": {"method": "gptq"},
        "adaround": {"method": "adaround", "iters": 50},
        "nr": {"method": "adaround", "final_refit": "none", "lam": 1.5},
    }
