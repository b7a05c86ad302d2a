"""Settings of the fuse stage (TSDF fusion, mesh cleaning); light to import: checked when the config loads."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.settings import at_least, between, device_choice, greater_than, or_automatic, setting


@dataclass(kw_only=True)
class FuseConfig:
    voxel_size: float | None = setting(
        None, "TSDF voxel size in normalized-frame units (null: voxel_factor x the median pixel footprint depth/focal "
        "of the sparse points at the depth maps' resolution).", check=or_automatic(greater_than(0)))
    voxel_factor: float = setting(
        1.0, "Automatic voxel size in pixel footprints at the sparse points' median depth (used when voxel_size is "
        "null).", check=greater_than(0))
    sdf_trunc: float | None = setting(
        None, "TSDF truncation distance in normalized-frame units (null: trunc_voxels x voxel size).",
        check=or_automatic(greater_than(0)))
    trunc_voxels: float = setting(
        6.0, "Automatic truncation distance in voxels (used when sdf_trunc is null); larger fills surfaces seen by few "
        "views or at grazing angles, smaller keeps thin parts and concave corners sharp.", check=greater_than(0))
    depth_max: float | None = setting(
        None, "Depth cut-off in normalized-frame units: farther depth is not fused (null: depth_max_factor x the 99th "
        "percentile of sparse-point depths).", check=or_automatic(greater_than(0)))
    depth_max_factor: float = setting(
        1.5, "Automatic depth cut-off as a multiple of the 99th percentile of sparse-point depths (used when depth_max "
        "is null).", check=greater_than(0))
    min_confidence: float = setting(
        0.1, "Depth pixels with confidence below this (0..1) are not fused.", check=between(0, 1))
    min_views: int = setting(
        1, "A voxel becomes surface only if at least this many depth maps observed it.", check=at_least(1))
    block_resolution: int = setting(8, "Voxels per side of a voxel block (Open3D VoxelBlockGrid).", check=at_least(2))
    block_count: int | None = setting(
        None, "Initial voxel-block capacity in blocks (null: counted from the depth maps first); the grid grows when "
        "it is too small.", affects_output=False, check=or_automatic(at_least(1)))
    max_memory_gb: float = setting(
        8.0, "Fail clearly instead of allocating a voxel grid larger than this (GiB).",
        affects_output=False, check=greater_than(0))
    crop: bool = setting(
        True, "Fuse and keep only the region the cameras look at (see crop_view_fraction); false fuses everything up "
        "to depth_max.")
    crop_view_fraction: float = setting(
        0.5, "Region of interest: sparse points inside at least this fraction of the most-viewed point's camera "
        "frustums.", check=between(0, 1))
    crop_percentile: float = setting(
        1.0, "Region of interest: per-axis percentile range [p, 100-p] of those points.",
        check=between(0, 50, open_high=True))
    crop_margin: float = setting(
        0.1, "Region of interest: grown on every side by this fraction of its diagonal.", check=at_least(0))
    min_component_fraction: float = setting(
        0.001, "Remove connected mesh components with fewer triangles than this fraction of the largest one (0 keeps "
        "all).", check=between(0, 1))
    visibility_margin: float = setting(
        0.12, "Visibility cleaning: a mesh vertex is removed with its triangles (floaters, surfaces fused from "
        "too-near depth) when more depth maps see through it (their depth more than this relative amount behind it) "
        "than agree with it (visibility_agree); 0 = off.", check=at_least(0))
    visibility_agree: float = setting(
        0.01, "Visibility cleaning: a depth map agrees with a vertex when its depth there is within this relative "
        "distance of the vertex.", check=greater_than(0))
    resize_masks: bool = setting(
        False, "Masks of another size than their photo are stretched to it (false: such a mask stops the run before "
        "SfM).", affects_output=False)
    device: str = setting(
        "auto", "Open3D device: auto (CUDA:0 when present), cpu or cuda.",
        affects_output=False, check=device_choice("open3d"))
