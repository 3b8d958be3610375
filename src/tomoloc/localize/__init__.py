"""Localization methods, one module each, one interface (:class:`Localizer`).

Every localizer takes a 3D array-like (Z, Y, X), axis 0 = rotation axis, and returns a
:class:`Localization` whose box is in that volume's voxel coordinates.
"""

from tomoloc.localize.base import (
    BadValuesError,
    Localization,
    Localizer,
    localize_file,
    localize_files,
    working_copy,
)
from tomoloc.localize.threshold import (
    MultiOtsuLocalizer,
    OtsuLocalizer,
    ThresholdLocalizer,
    calibrate_threshold,
)

__all__ = [
    "BadValuesError",
    "Localization",
    "Localizer",
    "MultiOtsuLocalizer",
    "OtsuLocalizer",
    "ThresholdLocalizer",
    "calibrate_threshold",
    "localize_file",
    "localize_files",
    "working_copy",
]
