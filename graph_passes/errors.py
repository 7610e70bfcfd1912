"""One exception hierarchy for the whole package.

Every error a user can cause derives from :class:`UserError`; the CLI prints its one-line message and exits
with code 2 (no traceback unless ``--debug``). Anything else is a bug and exits with code 1.
Messages name the file/node/option at fault and say what to do.
"""

from __future__ import annotations

__all__ = [
    "AdaroundError",
    "CalibrationError",
    "InternalError",
    "InvalidModelError",
    "InvalidOptionError",
    "NoQuantizableWeightsError",
    "OutputPathError",
    "UnsupportedSchemeError",
    "UserError",
]


class AdaroundError(Exception):
    """Base class of every error raised on purpose by optimum-adaround."""

    exit_code = 1


class UserError(AdaroundError):
    """Bad input: the message alone tells the user what is wrong. CLI exit code 2."""

    exit_code = 2


class InvalidModelError(UserError):
    """The input is not a loadable ONNX model (not ONNX, truncated, missing external data, ...)."""


class NoQuantizableWeightsError(UserError):
    """The graph has no MatMul/Gemm with a constant 2-D weight that the options select."""


class UnsupportedSchemeError(UserError):
    """A bits / block size / format / symmetry combination that no packer or kernel supports."""


class OutputPathError(UserError):
    """The output path is unusable: equal to or inside the input, non-empty without --overwrite, ..."""


class InvalidOptionError(UserError):
    """An option (API keyword, CLI flag, recipe key, method option) is unknown or out of range."""


class CalibrationError(UserError):
    """Calibration data is missing, empty, too short, or does not match the model."""


class InternalError(AdaroundError):
    """An invariant of ours broke: a bug to report. CLI exit code 1."""
