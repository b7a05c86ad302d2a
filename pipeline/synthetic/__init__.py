"""Rendered scenes with ground truth, for tests and benchmarks: shapes, materials and textures (``shapes``),
cameras and rendering (``render``), ground-truth COLMAP models (``groundtruth``), monocular-like priors
(``priors``), ground-truth depth fused by the fuse stage's code (``fusion``).
"""
