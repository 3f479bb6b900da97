"""Data: MVTec 3D-AD reader, depth / point-cloud preprocessing, synthetic station."""

from edge_runtime.data.sample import Sample

__all__ = ["Sample"]
