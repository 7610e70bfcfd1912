"""The public surface: one import root, an explicit ``__all__``, no stray top-level packages."""

import importlib
import importlib.util
import subprocess
import sys

import optimum.adaround as oa

EXPECTED = {
    "quantize", "export", "load", "session_options", "QuantConfig", "CalibrationConfig", "SelectionConfig",
    "OutputConfig", "QuantScheme", "WeightFormat", "DataType", "PER_CHANNEL", "UserError", "AdaroundError",
    "InvalidModelError", "InvalidOptionError", "NoQuantizableWeightsError", "OutputPathError",
    "UnsupportedSchemeError", "CalibrationError", "__version__",
}  # fmt: skip


def test_all_is_explicit_and_importable():
    assert set(oa.__all__) >= EXPECTED
    assert "Recipe" not in oa.__all__ and not hasattr(oa, "Recipe")  # a recipe is a QuantConfig's record
    for name in oa.__all__:
        assert getattr(oa, name) is not None, name


def test_top_level_config_is_the_one_quantize_takes():
    config = oa.QuantConfig().with_overrides(method="rtn", bits=8)
    assert oa.QuantConfig.from_dict(config.to_dict()) == config
    assert issubclass(oa.InvalidOptionError, oa.UserError)


def test_no_top_level_import_of_source_folders(tmp_path):
    # The folders map under optimum.adaround; the installed package must not expose them by folder name.
    # Run outside the checkout: `python -m pytest` puts the repository root itself on sys.path.
    code = "import importlib.util as u; print([n for n in ('plugin', 'graph_passes', 'custom_ops') if u.find_spec(n)])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_subpackages_live_under_one_root():
    for mod in ("graph_passes", "custom_ops", "commands", "data"):
        m = importlib.import_module(f"optimum.adaround.{mod}")
        assert m.__name__.startswith("optimum.adaround.")


def test_optimum_stays_a_namespace_package():
    import optimum

    assert getattr(optimum, "__file__", None) is None  # PEP 420: no optimum/__init__.py shipped by anyone
