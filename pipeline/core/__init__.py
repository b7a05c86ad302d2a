"""Shared core: errors, settings declarations, workspace layout, caches, image/depth I/O, camera geometry, OOM handling.

Nothing here imports a stage.
"""
