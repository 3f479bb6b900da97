"""Shared feature extractors as pure ``torch.nn.Module`` code (no file I/O, no downloads).

Import the submodules directly, e.g. ``from edge_runtime.nets.efficientnet import
EfficientNetFeatures`` or ``from edge_runtime.nets.fpfh import fpfh``.
"""
