"""Exceptions shared across the project.

Every error about a file names the file and the problem, so an operator can fix the
input without reading a traceback.
"""

from __future__ import annotations

from pathlib import Path


class EdgeError(Exception):
    """Base class of the project's own errors."""


class DataError(EdgeError):
    """A dataset file (or a frame) is missing, unreadable or malformed.

    ``str(err)`` is ``"<path>: <problem>"``; both parts are kept as attributes.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class BundleError(EdgeError):
    """A model bundle is missing, incomplete, tampered with or incompatible."""


class BackendUnavailable(EdgeError):
    """A requested inference backend (TensorRT, CUDA, onnxruntime) is not usable here."""
