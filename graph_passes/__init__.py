"""Graph passes: weight-site discovery, calibration, rounding algorithms, packers and rewrite passes.

Layering: ``optimum.adaround`` (plugin) -> ``graph_passes`` -> onnx-ir. Nothing here imports the plugin.
"""

from .errors import (
    AdaroundError,
    CalibrationError,
    InternalError,
    InvalidModelError,
    NoQuantizableWeightsError,
    OutputPathError,
    UnsupportedSchemeError,
    UserError,
)
from .records import QuantizedWeight, SiteReport, SkippedSite, WeightSite
from .scheme import PER_CHANNEL, DataType, QuantScheme, WeightFormat

__all__ = [
    "PER_CHANNEL",
    "AdaroundError",
    "CalibrationError",
    "DataType",
    "InternalError",
    "InvalidModelError",
    "NoQuantizableWeightsError",
    "OutputPathError",
    "QuantScheme",
    "QuantizedWeight",
    "SiteReport",
    "SkippedSite",
    "UnsupportedSchemeError",
    "UserError",
    "WeightFormat",
    "WeightSite",
]
