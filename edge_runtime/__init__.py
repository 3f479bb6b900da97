"""edge_runtime: streaming edge runtime for multimodal (RGB + 3D) industrial anomaly detection.

The station side and the shared core. ``train``, ``calibrate`` and ``deploy`` import
this package; this package never imports them.
"""

__version__ = "0.1.0"
