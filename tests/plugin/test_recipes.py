"""Recipes: presets, round trips through dict / YAML / JSON, and one-line errors naming the bad key."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum.adaround.graph_passes.errors import UnsupportedSchemeError, UserError
from optimum.adaround.graph_passes.scheme import QuantScheme
from optimum.adaround.recipes import (
    PRESETS,
    ModuleOverride,
    Recipe,
    RecipeError,
    get_preset,
    load_recipe,
    resolve_recipe,
    save_recipe,
)

CUSTOM = Recipe(
    name="custom",
    scheme="w3-g64-asym",
    method="gptq",
    method_options={"damp": 0.02, "act_order": True},
    format="lowbit",
    calib_data="news",
    calib_samples=16,
    seq_len=128,
    sequential=False,
    include=("layers\\.",),
    exclude=("lm_head", "embed"),
    quantize_lm_head=True,
    seed=3,
    overrides=(ModuleOverride("mlp\\.down_proj", "w8-g128"),),
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    r = get_preset(name)
    assert r.name == name
    assert isinstance(r.quant_scheme, QuantScheme)
    assert Recipe.from_dict(r.to_dict()) == r
    assert name.startswith(f"w{r.quant_scheme.bits}-") and name.endswith(r.method)


def test_required_presets_exist():
    assert {"w4-g128-adaround", "w4-g128-gptq", "w3-g128-adaround", "w4-g128-rtn"} <= set(PRESETS)


def test_custom_round_trip_dict_yaml_json(tmp_path):
    assert Recipe.from_dict(CUSTOM.to_dict()) == CUSTOM
    assert load_recipe(save_recipe(CUSTOM, tmp_path / "r.yaml")) == CUSTOM
    assert load_recipe(save_recipe(CUSTOM, tmp_path / "r.json")) == CUSTOM
    assert json.loads((tmp_path / "r.json").read_text())["version"] == Recipe.VERSION


def test_quantize_kwargs_mirror_fields():
    kw = CUSTOM.quantize_kwargs()
    assert kw["scheme"] == "w3-g64-asym" and kw["method"] == "gptq" and kw["format"] == "lowbit"
    assert kw["exclude"] == ("lm_head", "embed") and kw["method_options"] == {"damp": 0.02, "act_order": True}
    assert kw["calib_samples"] == 16 and kw["seq_len"] == 128 and kw["sequential"] is False


def test_lists_and_tuples_compare_equal_and_scalar_regex_accepted():
    a = Recipe.from_dict({"exclude": ["lm_head"], "include": "layers"})
    assert a == Recipe(exclude=("lm_head",), include=("layers",))


def test_override_shorthand_mapping():
    r = Recipe.from_dict({"overrides": {"down_proj": "w8-g128"}})
    assert r.overrides == (ModuleOverride("down_proj", "w8-g128"),)


@pytest.mark.parametrize(
    ("data", "error", "needle"),
    [
        ({"shceme": "w4-g128"}, RecipeError, "shceme"),
        ({"version": 2}, RecipeError, "version 2"),
        ({"scheme": "w4-q128"}, UnsupportedSchemeError, "w4-q128"),
        ({"scheme": "w9-g128"}, UnsupportedSchemeError, "bits=9"),
        ({"format": "gguf"}, RecipeError, "format='gguf'"),
        ({"calib_samples": 0}, RecipeError, "calib_samples"),
        ({"calib_samples": True}, RecipeError, "calib_samples"),
        ({"sequential": "yes"}, RecipeError, "sequential"),
        ({"exclude": ["("]}, RecipeError, "exclude"),
        ({"exclude": 3}, RecipeError, "exclude"),
        ({"overrides": [{"pattern": "x"}]}, RecipeError, "pattern and scheme"),
        ({"overrides": [{"pattern": "x", "scheme": "w4-zz"}]}, UnsupportedSchemeError, "w4-zz"),
        ({"method_options": [1]}, RecipeError, "method_options"),
        ({"method": 4}, RecipeError, "method"),
    ],
)
def test_bad_recipes_raise_one_line_user_errors(data, error, needle):
    with pytest.raises(error) as info:
        Recipe.from_dict(data)
    assert isinstance(info.value, UserError)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nmethod: gptq\ngroup: 64\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*unknown recipe key\(s\): group"):
        load_recipe(p)


def test_invalid_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("method: [gptq\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)


def test_resolve_recipe(tmp_path):
    assert resolve_recipe(None) is None
    assert resolve_recipe("w4-g128-gptq") == PRESETS["w4-g128-gptq"]
    assert resolve_recipe({"method": "rtn"}) == Recipe(method="rtn")
    path = save_recipe(CUSTOM, tmp_path / "c.yaml")
    assert resolve_recipe(str(path)) == CUSTOM
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="neither a preset"):
        resolve_recipe("w4-g128-magic")


def test_replace_rejects_unknown_keys():
    assert Recipe().replace(method="rtn").method == "rtn"
    with pytest.raises(RecipeError, match="bits"):
        Recipe().replace(bits=3)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([-1, 16, 32, 64, 128, 256]),
    sym=st.booleans(),
    method=st.sampled_from(["rtn", "gptq", "adaround"]),
    samples=st.integers(1, 4096),
    exclude=st.lists(st.sampled_from(["lm_head", "q_proj", "mlp\\..*", "layers\\.[0-3]\\."]), max_size=3),
    override=st.none() | st.sampled_from(["down_proj", "o_proj"]),
)
def test_round_trip_property(bits, group, sym, method, samples, exclude, override):
    g = "pc" if group == -1 else f"g{group}"
    r = Recipe(
        scheme=f"w{bits}-{g}-{'sym' if sym else 'asym'}",
        method=method,
        calib_samples=samples,
        exclude=tuple(exclude),
        overrides=() if override is None else (ModuleOverride(override, "w8-g128"),),
    )
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("value", [0.5, True, "64", 2e6])
def test_sink_weight_must_be_a_number_of_at_least_one(value):
    with pytest.raises(RecipeError, match="sink_weight="):
        Recipe(sink_weight=value)
    assert Recipe(sink_weight=16).quantize_kwargs()["sink_weight"] == 16.0
