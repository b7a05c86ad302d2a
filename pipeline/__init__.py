"""recon: photos to a clean coloured mesh.

Stages (one module each): :mod:`pipeline.sfm` → :mod:`pipeline.depth` →
:mod:`pipeline.refine` → :mod:`pipeline.fuse` → :mod:`pipeline.export`.
Shared core: :mod:`pipeline.config`, :mod:`pipeline.cache`,
:mod:`pipeline.workspace`, :mod:`pipeline.geometry`, :mod:`pipeline.io`.
"""

__version__ = "0.1.0"
