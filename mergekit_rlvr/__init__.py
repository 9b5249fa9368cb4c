"""mergekit-rlvr: merge post-trained checkpoints the way DoTS, SAR-Merging and
reasoning interpolation do, and search merge coefficients on a running vLLM engine.

Importing this package is cheap: no torch, no mergekit. The merge methods register
themselves with mergekit when mergekit's merge-method registry is first imported
(see ``mergekit_rlvr._autoload``).
"""

__version__ = "0.1.0"
