"""optimum-adaround: calibrated adaptive rounding for ONNX LLMs exported with Optimum.

Public API (see ``__all__``). Layering: this package (API, CLI, Optimum integration, model card)
-> ``optimum.adaround.graph_passes`` -> onnx-ir. ``optimum.adaround.custom_ops`` stands alone.
"""

from .api import quantize
from .export import export
from .graph_passes.config import CalibrationConfig, OutputConfig, QuantConfig, SelectionConfig
from .graph_passes.errors import (
    AdaroundError,
    CalibrationError,
    InvalidModelError,
    InvalidOptionError,
    NoQuantizableWeightsError,
    OutputPathError,
    UnsupportedSchemeError,
    UserError,
)
from .graph_passes.scheme import PER_CHANNEL, DataType, QuantScheme, WeightFormat
from .loading import load, session_options

__version__ = "0.7.0"

__all__ = [
    "PER_CHANNEL",
    "AdaroundError",
    "CalibrationConfig",
    "CalibrationError",
    "DataType",
    "InvalidModelError",
    "InvalidOptionError",
    "NoQuantizableWeightsError",
    "OutputConfig",
    "OutputPathError",
    "QuantConfig",
    "QuantScheme",
    "SelectionConfig",
    "UnsupportedSchemeError",
    "UserError",
    "WeightFormat",
    "__version__",
    "export",
    "load",
    "quantize",
    "session_options",
]
