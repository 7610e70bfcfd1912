"""benchmarks/predictor.py: the measured rows rebuilt from a kept result."""

from __future__ import annotations

from pathlib import Path

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "predictor.json"


def test_rows_rebuilt_from_a_result_plan_the_sizes_their_runs_wrote(predictor, predictor_report):
    """Each uniform and random row's site schemes, planned again from its options, pack to the bits per
    weight that row's run recorded (the random rows' per-unit draws and float units included)."""
    import json

    from optimum.adaround.graph_passes.model_io import load_model
    from optimum.adaround.graph_passes.pipeline import prepare_sites
    from optimum.adaround.graph_passes.predict.estimate import packed_bytes

    source = predictor.default_source()
    rebuilt = predictor.measured_from(RESULT, source, 6)
    recorded = {r["name"]: r for r in json.loads(RESULT.read_text())["rows"]}
    sites = {s.name: s for s in prepare_sites(load_model(str(source)).model, quantize_lm_head=True).sites}
    assert len(rebuilt) == 1 + 22 and rebuilt["fp32"]["ppl"] > 0
    for name, row in rebuilt.items():
        if name == "fp32":
            continue
        chosen = [sites[n] for n in row["site_schemes"]]
        by_label = predictor_report._schemes(set(row["site_schemes"].values()), chosen)
        packed = sum(packed_bytes(by_label[row["site_schemes"][s.name]], s.k, s.n) for s in chosen)
        bits = 8 * packed / sum(s.k * s.n for s in chosen)
        assert abs(bits - recorded[name]["bits_per_weight"]) < 1e-9, name
        assert row["ppl"] == recorded[name]["ppl"]
