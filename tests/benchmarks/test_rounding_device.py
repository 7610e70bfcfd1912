"""benchmarks/rounding_device.py (a script, imported by path): the site files it reads back and its table."""

from __future__ import annotations

import json

import numpy as np


def test_saved_sites_round_on_the_cpu_and_sum_up(rounding_device, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    x = rng.standard_normal((512, 256)) @ rng.standard_normal((256, 256)) / 16
    h = (x.T @ x).astype(np.float32)
    np.savez(  # the layout `dump` writes
        tmp_path / "layer.q.npz", site="layer.q", weight=w, hessian=h, n_tokens=512,
        extra_names=np.array(["hessian_first_position"]), extra_hessian_first_position=np.outer(x[0], x[0]),
        tokens=json.dumps({"first_position_tokens": 1}),
    )  # fmt: skip
    rows = rounding_device.time_sites(tmp_path, ["cpu"], ["gptq", "adaround"], None)
    assert [(r["method"], r["device"], r["site"]) for r in rows] == [
        ("gptq", "cpu", "layer.q"),
        ("adaround", "cpu", "layer.q"),
    ]
    assert rows[1]["proxy_loss"] <= rows[0]["proxy_loss"]  # AdaRound starts from GPTQ and never gets worse
    table = rounding_device.summary(rows)
    assert table[0] == "| method | device | sites | block s | proxy loss (sum) |"
    assert table[2].startswith("| gptq | cpu | 1 | ") and table[3].startswith("| adaround | cpu | 1 | ")
