"""Shared core: errors, settings declarations, workspace layout, caches, image/depth I/O, camera geometry, OOM handling,
the command-line console (logging, one-line failures).

Nothing here imports a stage.
"""
