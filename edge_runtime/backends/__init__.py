"""Backends: the same bundle run by torch, onnxruntime, TensorRT (or a no-op stand-in).

``detector.py`` holds the Detector interface and Result, ``registry.py`` the backend
names and ``load_detector``; each backend is one module. Re-exported here::

    from edge_runtime.backends import Detector, Result, load_detector
"""

from edge_runtime.backends.detector import Detector, Result
from edge_runtime.backends.registry import BACKENDS, CHOICES, load_detector

__all__ = ["BACKENDS", "CHOICES", "Detector", "Result", "load_detector"]
