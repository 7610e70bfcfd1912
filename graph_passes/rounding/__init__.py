"""Rounding methods: each turns a float weight (+ calibration statistics) into a QuantizedWeight.

Importing the package registers every method (``base.METHODS``): ``rtn``, ``gptq``, ``adaround``,
``adaround_ls``; each module holds the method's config class and its implementation.
"""

from . import (  # noqa: F401  (registers the methods)
    adaround,
    gptq,
    learned_scale,
    rtn,
)
