"""recon: photos to a clean coloured mesh.

Stages, one package each, run in this order by :mod:`pipeline.graph`:
:mod:`pipeline.sfm` → :mod:`pipeline.depth` → :mod:`pipeline.refine` →
:mod:`pipeline.fuse` → :mod:`pipeline.export`. Each exposes its ``Config``,
``run`` and its core function. :mod:`pipeline.config` assembles the stages'
settings into one :class:`~pipeline.config.ReconConfig`. Shared code lives in
:mod:`pipeline.core` (which imports no stage); :mod:`pipeline.analysis`
evaluates and reports; :mod:`pipeline.synthetic` renders test scenes.
"""

__version__ = "0.1.0"
