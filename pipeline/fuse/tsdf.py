"""TSDF fusion (Open3D ``VoxelBlockGrid``) of depth maps and colours into a cleaned mesh: the fuse stage's engine.

Works on frames in memory or streamed (:class:`FusionFrame`: a depth map, its
colours, an optional mask) and absolute settings (:class:`FusionParams`, which
:func:`pipeline.fuse.stage.resolve_params` derives from the ``fuse.*`` settings);
no workspace. A first pass counts the voxel blocks the frames touch inside the
region of interest, so the hash map is allocated once at the right size; a map
that still drops blocks is detected after every view and the fusion restarts
with twice the capacity. The extracted surface is cleaned with
:mod:`pipeline.fuse.clean`.

Pixel convention: Open3D's TSDF kernels read the depth pixel
``(int(u), int(v))`` of a projected voxel, i.e. pixel ``(i, j)`` covers
``[i, i+1) x [j, j+1)`` — COLMAP's convention, so ``K`` is passed unchanged
(checked: a slanted plane fuses without bias with ``K`` as is, and with a
half-pixel depth bias when ``cx, cy`` are shifted by -0.5).
"""

from __future__ import annotations

import collections.abc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from pipeline.core.errors import ReconError
from pipeline.core.io import DepthMap
from pipeline.fuse.clean import clean_mesh, remove_vertices, visibility_outliers, visibility_votes

logger = logging.getLogger(__name__)


BYTES_PER_VOXEL = 4 + 4 + 3 * 4
"""tsdf (float32) + weight (float32) + colour (3 x float32)."""
MAX_ATTEMPTS = 3
"""Fusion restarts (capacity doubled each time) before a dropping hash map is reported."""


@dataclass(frozen=True, kw_only=True)
class FusionParams:
    """Resolved fusion settings (absolute values, normalized-frame units)."""

    voxel_size: float
    sdf_trunc: float
    depth_max: float
    block_resolution: int = 8
    block_count: int = 0
    """Initial hash-map capacity in blocks; 0 = count the blocks the depth maps touch first."""
    min_confidence: float = 0.0
    min_views: int = 1
    roi_min: tuple[float, float, float] | None = None
    roi_max: tuple[float, float, float] | None = None
    """Axis-aligned region of interest: blocks outside are not allocated, the mesh is cropped to it."""
    min_component_fraction: float = 0.0
    visibility_margin: float = 0.0
    """Visibility cleaning (:func:`visibility_outliers`); 0 = off."""
    visibility_agree: float = 0.01
    max_memory_gb: float = 8.0

    @property
    def block_bytes(self) -> int:
        return self.block_resolution**3 * BYTES_PER_VOXEL

    @property
    def roi(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.roi_min is None or self.roi_max is None:
            return None
        return np.asarray(self.roi_min, dtype=np.float64), np.asarray(self.roi_max, dtype=np.float64)


@dataclass(frozen=True)
class FusionFrame:
    """One view to fuse: its depth map, its colours (any resolution) and an optional mask (True = keep)."""

    depth_map: DepthMap
    rgb: np.ndarray | Callable[[], np.ndarray]
    """(H', W', 3) uint8 (resized to the depth map's resolution), or a function loading it (read only when
    integrating)."""
    mask: np.ndarray | None = None
    """(H, W) bool at the depth map's resolution, or None."""


FrameLike = Union[FusionFrame, tuple]
FrameSource = Union[Iterable[FrameLike], Callable[[], Iterable[FrameLike]]]
Progress = Callable[[Iterable[Any], str, int | None], Iterable[Any]]


@dataclass
class FusionResult:
    mesh: Any
    """``open3d.geometry.TriangleMesh`` (legacy) with vertex colours in [0, 1] and normals."""
    stats: dict[str, Any] = field(default_factory=dict)


# ---- devices -------------------------------------------------------------------------------------------


def open3d_device(preference: str = "auto"):
    """``open3d.core.Device``: CUDA:0 when asked for (or ``auto`` and present), else CPU:0.

    Raises:
        ReconError: ``cuda`` asked for but Open3D sees no CUDA device.
    """
    import open3d.core as o3c

    pref = preference.lower()
    if pref not in ("auto", "cpu", "cuda") and not pref.startswith("cuda:"):
        raise ReconError(f"fuse.device={preference!r}: expected auto, cpu or cuda")
    has_cuda = o3c.cuda.is_available()
    if pref.startswith("cuda") and not has_cuda:
        raise ReconError(f"fuse.device={preference}: this Open3D build sees no CUDA device; "
                         "use fuse.device=auto or cpu")
    if pref == "cpu" or (pref == "auto" and not has_cuda):
        return o3c.Device("CPU:0")
    return o3c.Device(pref.upper() if ":" in pref else "CUDA:0")


# ---- per-frame inputs ------------------------------------------------------------------------------------


def fusion_depth(dm: DepthMap, *, min_confidence: float, depth_max: float,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """(H, W) float32 depth to integrate: 0 where invalid, low-confidence, masked out, non-finite or beyond
    ``depth_max``."""
    depth = np.asarray(dm.depth, dtype=np.float32)
    keep = np.asarray(dm.valid, dtype=bool) & np.isfinite(depth) & (depth > 0) & (depth <= depth_max)
    keep &= np.asarray(dm.confidence) >= min_confidence
    if mask is not None:
        if mask.shape != depth.shape:
            raise ValueError(f"mask shape {mask.shape} does not match depth {depth.shape}")
        keep &= mask
    return np.where(keep, depth, np.float32(0.0)).astype(np.float32)


def resize_rgb(rgb: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H', W', 3) → float32 (H, W, 3) in [0, 1] at ``shape_hw`` (box filter when shrinking)."""
    from PIL import Image

    h, w = shape_hw
    if rgb.shape[:2] != (h, w):
        shrink = rgb.shape[0] >= h and rgb.shape[1] >= w
        im = Image.fromarray(np.ascontiguousarray(rgb[..., :3].astype(np.uint8)))
        im = im.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        rgb = np.asarray(im)
    return np.ascontiguousarray(rgb[..., :3], dtype=np.float32) / np.float32(255.0)


def _as_frame(item: FrameLike) -> FusionFrame:
    if isinstance(item, FusionFrame):
        return item
    if isinstance(item, tuple) and len(item) in (2, 3):
        return FusionFrame(*item)
    raise TypeError(f"a fusion frame is a FusionFrame or (DepthMap, rgb[, mask]), got {type(item).__name__}")


def _frame_factory(frames: FrameSource) -> Callable[[], Iterable[FrameLike]]:
    """A function returning a fresh iterable of frames (fusion reads them twice: count, then integrate)."""
    if callable(frames):
        return frames
    if isinstance(frames, collections.abc.Iterator):
        frames = list(frames)  # a one-shot iterator cannot be read twice
    return lambda: frames


# ---- the fusion ---------------------------------------------------------------------------------------


class _BlocksDropped(RuntimeError):
    """The voxel-block hash map could not hold every block of a view."""


def _pack_blocks(coords: np.ndarray) -> np.ndarray:
    """(N, 3) int block coordinates → (N,) int64 keys (21 bits per axis)."""
    c = coords.astype(np.int64) + (1 << 20)
    return (c[:, 0] << 42) | (c[:, 1] << 21) | c[:, 2]


def _blocks_in_roi(coords: np.ndarray, block_size: float, roi: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Mask of blocks (N, 3) whose extent ``[b, b+1) * block_size`` touches the ROI box."""
    if roi is None:
        return np.ones(len(coords), dtype=bool)
    lo, hi = roi
    b = coords.astype(np.float64)
    return np.all((b + 1) * block_size >= lo, axis=1) & np.all(b * block_size <= hi, axis=1)


@dataclass
class _PreparedFrame:
    """Open3D inputs of one frame and the voxel blocks it touches inside the ROI."""

    depth: Any
    """``open3d.t.geometry.Image`` float32 depth on the fusion device (0 = not fused)."""
    K: Any
    extrinsic: Any
    """``open3d.core.Tensor`` float64 intrinsics and world→camera pose (CPU)."""
    blocks: Any
    """``open3d.core.Tensor`` (N, 3) int32 block coordinates on the fusion device."""
    blocks_np: np.ndarray


class _Integrator:
    """Builds voxel-block grids and integrates frames into them (Open3D tensor API)."""

    def __init__(self, params: FusionParams, device):
        import open3d as o3d
        import open3d.core as o3c

        self.o3d, self.o3c, self.params, self.device = o3d, o3c, params, device
        self.trunc_mult = params.sdf_trunc / params.voxel_size
        self.block_size = params.voxel_size * params.block_resolution
        # A grid used only for its frustum hash map (block coordinates of a depth image).
        self.toucher = self.new_grid(1)

    def new_grid(self, capacity: int):
        o3c = self.o3c
        return self.o3d.t.geometry.VoxelBlockGrid(
            attr_names=("tsdf", "weight", "color"),
            attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
            attr_channels=((1), (1), (3)),
            voxel_size=self.params.voxel_size,
            block_resolution=self.params.block_resolution,
            block_count=max(1, int(capacity)),
            device=self.device,
        )

    def prepare(self, frame: FusionFrame) -> _PreparedFrame | None:
        """The frame's Open3D inputs and touched blocks, or None when it has nothing to fuse."""
        o3c, o3d, p = self.o3c, self.o3d, self.params
        dm = frame.depth_map
        depth = fusion_depth(dm, min_confidence=p.min_confidence, depth_max=p.depth_max, mask=frame.mask)
        if not (depth > 0).any():
            return None
        depth_img = o3d.t.geometry.Image(o3c.Tensor(depth)).to(self.device)
        K = o3c.Tensor(np.asarray(dm.K, dtype=np.float64))
        extrinsic = o3c.Tensor(np.asarray(dm.cam_from_world, dtype=np.float64))
        try:
            coords_t = self.toucher.compute_unique_block_coordinates(depth_img, K, extrinsic, 1.0, p.depth_max,
                                                                     self.trunc_mult)
        except RuntimeError as exc:
            if "No block is touched" not in str(exc):
                raise
            return None  # a nearly empty view (a speck of depth that Open3D's subsampled touch misses): nothing to fuse
        coords = coords_t.cpu().numpy().reshape(-1, 3)
        keep = _blocks_in_roi(coords, self.block_size, p.roi)
        if not keep.any():
            return None
        if not keep.all():
            coords = np.ascontiguousarray(coords[keep])
            coords_t = o3c.Tensor(coords).to(self.device)
        return _PreparedFrame(depth_img, K, extrinsic, coords_t, coords)

    def integrate(self, grid, frame: FusionFrame, prepared: _PreparedFrame) -> None:
        """Integrate one frame (depth + colour) into ``grid``; raise ``_BlocksDropped`` if the map lost blocks."""
        o3c, o3d, p = self.o3c, self.o3d, self.params
        rgb = frame.rgb() if callable(frame.rgb) else frame.rgb
        color = resize_rgb(rgb, frame.depth_map.shape)
        color_img = o3d.t.geometry.Image(o3c.Tensor(color)).to(self.device)
        # Same K for depth and colour: the colour is resized to the depth map's resolution.
        grid.integrate(prepared.blocks, prepared.depth, color_img, prepared.K, prepared.K, prepared.extrinsic,
                       1.0, p.depth_max, self.trunc_mult)
        _, found = grid.hashmap().find(prepared.blocks)
        found = found.cpu().numpy()
        if not found.all():
            raise _BlocksDropped(f"{int((~found).sum())} of {len(found)} blocks of {frame.depth_map.name} were dropped")


def _identity(it: Iterable[Any], desc: str, total: int | None) -> Iterable[Any]:
    return it


def count_blocks(frames: Callable[[], Iterable[FrameLike]], integ: _Integrator, progress: Progress,
                 total: int | None) -> tuple[int, int]:
    """(distinct voxel blocks touched by all frames inside the ROI, most blocks touched by one frame)."""
    keys = np.zeros(0, dtype=np.int64)
    most = 0
    for item in progress(frames(), "counting voxel blocks", total):
        prepared = integ.prepare(_as_frame(item))
        if prepared is None:
            continue
        most = max(most, len(prepared.blocks_np))
        keys = np.union1d(keys, _pack_blocks(prepared.blocks_np))
    return len(keys), most


def fuse_depth_maps(frames: FrameSource, params: FusionParams, device: str = "auto", *,
                    progress: Progress | None = None, total: int | None = None) -> FusionResult:
    """TSDF-fuse depth maps and colours into a mesh (normalized frame), cropped and cleaned per ``params``.

    Args:
        frames: ``FusionFrame`` or ``(DepthMap, rgb[, mask])`` items — a sequence, or a function returning a
            fresh iterable (to stream from disk: frames are read once to count blocks, once to integrate; a
            one-shot iterator is materialized). Depth maps: camera-frame z, COLMAP-convention ``K`` at their
            own resolution, ``cam_from_world`` poses.
        params: resolved settings (:func:`resolve_params`, or absolute values).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: ``progress(iterable, description, total) -> iterable`` (a progress bar), optional.
        total: number of frames, for the progress bar.
    Returns:
        :class:`FusionResult` with the legacy Open3D mesh and statistics.
    Raises:
        ReconError: nothing to fuse, an empty mesh, a grid beyond ``max_memory_gb``, or a hash map that keeps
            dropping blocks.
    """
    t0 = time.perf_counter()
    frames = _frame_factory(frames)
    progress = progress or _identity
    dev = open3d_device(device)
    integ = _Integrator(params, dev)
    budget = params.max_memory_gb * 2**30

    counted = 0
    if params.block_count > 0:
        capacity = params.block_count
    else:
        counted, most = count_blocks(frames, integ, progress, total)
        if counted == 0:
            raise ReconError("no depth to fuse: every depth pixel is invalid, below fuse.min_confidence, masked out, "
                             "beyond fuse.depth_max or outside the region of interest (try fuse.crop=false)")
        # Open3D grows (rehashes) the map when size + blocks of the next view > capacity, even if
        # those blocks exist already: leave room for one view's worth of blocks on top of the total.
        capacity = counted + most + 16
    needed_bytes = capacity * params.block_bytes
    if needed_bytes > budget:
        raise ReconError(
            f"TSDF fusion needs {capacity} voxel blocks ({needed_bytes / 2**30:.1f} GiB) "
            f"at voxel size {params.voxel_size:.4g}, "
            f"more than fuse.max_memory_gb={params.max_memory_gb:g}; raise fuse.voxel_size (or voxel_factor), "
            "keep fuse.crop=true, or raise fuse.max_memory_gb"
        )

    for attempt in range(1, MAX_ATTEMPTS + 1):
        grid = integ.new_grid(capacity)
        fused = 0
        try:
            for item in progress(frames(), "integrating", total):
                frame = _as_frame(item)
                prepared = integ.prepare(frame)
                if prepared is None:
                    continue
                integ.integrate(grid, frame, prepared)
                fused += 1
                if grid.hashmap().capacity() * params.block_bytes > budget:
                    raise ReconError(
                        f"TSDF fusion grew beyond fuse.max_memory_gb={params.max_memory_gb:g}; "
                        "raise fuse.voxel_size or fuse.max_memory_gb"
                    )
        except _BlocksDropped as exc:
            logger.warning("voxel-block hash map overflowed (%s, capacity %d); retrying with %d",
                           exc, capacity, 2 * capacity)
            del grid
            capacity *= 2
            if capacity * params.block_bytes > budget:
                raise ReconError(
                    f"TSDF fusion: the voxel-block hash map dropped blocks and growing it to {capacity} blocks exceeds "
                    f"fuse.max_memory_gb={params.max_memory_gb:g}; raise fuse.voxel_size or fuse.max_memory_gb"
                ) from exc
            continue
        break
    else:
        raise ReconError(
            f"TSDF fusion: the voxel-block hash map kept dropping blocks after {MAX_ATTEMPTS} attempts "
            f"(capacity {capacity}); set fuse.block_count higher or fuse.voxel_size larger"
        )
    if fused == 0:
        raise ReconError("no depth to fuse: every depth map is empty after the confidence, mask, depth and "
                         "region filters")
    t_integrate = time.perf_counter() - t0

    tmesh = grid.extract_triangle_mesh(weight_threshold=params.min_views - 0.5)
    mesh = tmesh.to_legacy()
    stats: dict[str, Any] = {
        "views_fused": fused,
        "blocks": int(grid.hashmap().size()),
        "blocks_counted": int(counted),
        "capacity": int(grid.hashmap().capacity()),
        "attempts": attempt,
        "grid_mib": round(grid.hashmap().capacity() * params.block_bytes / 2**20, 1),
        "raw_vertices": len(mesh.vertices),
        "raw_faces": len(mesh.triangles),
    }
    del grid, tmesh
    mesh = clean_mesh(mesh, params.roi, params.min_component_fraction)
    if params.visibility_margin > 0 and len(mesh.vertices):
        vertices = np.asarray(mesh.vertices)
        sees_through = np.zeros(len(vertices), dtype=np.int32)
        agrees = np.zeros(len(vertices), dtype=np.int32)
        for item in progress(frames(), "visibility check", total):
            frame = _as_frame(item)
            depth = fusion_depth(frame.depth_map, min_confidence=params.min_confidence, depth_max=params.depth_max,
                                 mask=frame.mask)
            through, agree = visibility_votes(vertices, depth, frame.depth_map.K, frame.depth_map.cam_from_world,
                                              margin=params.visibility_margin, agree=params.visibility_agree)
            sees_through += through
            agrees += agree
        outliers = visibility_outliers(sees_through, agrees)
        stats["visibility_removed_vertices"] = int(outliers.sum())
        mesh = remove_vertices(mesh, outliers)
    if len(mesh.triangles) == 0:
        raise ReconError("TSDF fusion produced an empty mesh; check the depth maps, fuse.min_views and the region "
                         "of interest (fuse.crop=false)")
    stats.update(integrate_seconds=round(t_integrate, 3), seconds=round(time.perf_counter() - t0, 3), device=str(dev))
    return FusionResult(mesh=mesh, stats=stats)
