"""tomoloc: find and crop the biological sample in 3D X-ray tomography volumes, without labels.

Axis 0 of every volume is the scanner's rotation (slice) axis.
"""

__version__ = "0.1.0"
