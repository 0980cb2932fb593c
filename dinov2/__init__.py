"""dinov2: self-supervised Vision Transformers the DINOv2 way.

Importing the package does no work: no backend flags, no optional imports, no file reads.
"""

__version__ = "0.1.0"
