"""depth stage: initial per-view depth maps, anchored to the sparse points.

Estimators (``depth.estimator``), all behind :class:`Estimator`:

* ``mvs`` (default, no weights): coarse-to-fine plane-sweep stereo in torch
  (:mod:`pipeline.depth.plane_sweep`) against ``num_neighbors`` neighbour views chosen from
  SfM co-visibility and triangulation angle, over a depth range taken from
  the sparse points the view sees. Its maps are metric in the normalized
  frame already; the sparse-point scale is measured and recorded, and applied
  only when it is off by more than ``mvs_rescale_tolerance`` (a per-view
  rescale of a correct map would only add noise and break multi-view
  consistency; a large deviation means a broken pose and is warned about).
* ``prior``: user files ``SCENE_DIR/depth_prior/<stem>.npy`` (float) or
  ``.png`` (16-bit), depth or inverse depth (``prior_kind``), optionally
  affine-invariant (``prior_affine``); always aligned to the sparse points.
* ``torchscript``: a TorchScript model (``torchscript_path``) mapping
  ``(1, 3, H, W)`` RGB in [0, 1] to ``(1, 1, H, W)`` / ``(1, H, W)`` / ``(H, W)``
  depth or inverse depth (``prior_kind``, ``prior_affine``); aligned like a prior.

A view that cannot be estimated or anchored (no neighbours, a missing or
malformed prior, too few sparse points) is warned about by name and left out;
if every view fails the stage raises :class:`~pipeline.core.errors.ReconError`.

Output, per view (:class:`pipeline.core.io.DepthMap`, ``OUT/depth/views/<stem>.npz``):
depth (normalized frame, 0 where invalid), confidence, valid mask, ``K`` at the
working resolution, ``cam_from_world`` and stats (anchoring, range, timings).

Two passes when the geometric-consistency filter is on (``mvs`` only): pass 1
writes every raw map to ``OUT/depth/raw/<stem>.npz``; pass 2, which needs all
of them, checks each pixel against its neighbours' raw maps and writes the
filtered map to ``OUT/depth/views``. Each pass skips views whose file exists,
and only the files in ``views/`` are read downstream, so an interrupted run
resumes without ever mixing filtered and unfiltered maps under one name.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.depth import anchoring
from pipeline.depth import plane_sweep as mvs
from pipeline.depth.config import DepthConfig, DepthEstimator, PriorKind  # noqa: F401 - re-exported
from pipeline.core.errors import ReconError
from pipeline.core.oom import call_with_oom_fallback
from pipeline.core.geometry import default_device, invert_pose, scale_intrinsics
from pipeline.core.io import DepthMap, SfmScene, View, claim_files, load_depth_map, load_rgb, load_sfm_scene, save_depth_map
from pipeline.core.settings import check_section
from pipeline.core.context import StageContext
from pipeline.core.workspace import Workspace, view_stem

logger = logging.getLogger(__name__)


class ViewFailure(Exception):
    """One view cannot get a depth map; the message names the file or reason. The view is left out."""


# ---- paths and sizes -----------------------------------------------------------------------

def raw_depth_path(ws: Workspace, image_name: str) -> Path:
    """Pass-1 (unfiltered) map of a view: ``OUT/depth/raw/<key>.npz``."""
    final = ws.depth_view(image_name)
    return final.parent.parent / "raw" / final.name


def adopted_depth_path(ws: Workspace, image_name: str) -> Path:
    """Map of a view after cross-view candidates (pass 1b), before the filter: ``OUT/depth/adopted/<key>.npz``."""
    final = ws.depth_view(image_name)
    return final.parent.parent / "adopted" / final.name


def prior_candidates(ws: Workspace, image_name: str) -> list[Path]:
    """Files a user may supply as the prior of an image, in order, each as ``.npy`` then ``.png``:
    ``depth_prior/<image name>`` (``a/b.jpg.npy``), the name without its extension (``a/b.npy``),
    then the flat stem (``a__b.npy``)."""
    no_ext = image_name.rsplit(".", 1)[0] if "." in Path(image_name).name else image_name
    stems = dict.fromkeys([image_name, no_ext, view_stem(image_name)])
    return [ws.depth_prior_dir / f"{stem}{ext}" for stem in stems for ext in (".npy", ".png")]


def unambiguous_prior_candidates(ws: Workspace, names: Sequence[str]) -> dict[str, list[Path]]:
    """:func:`prior_candidates` of every image, less the files two images would share (``a.npy`` for ``a.jpg``
    and ``a.png``, see :func:`pipeline.core.io.claim_files`), so one photo's depth is never fused with another's colours."""
    return claim_files({name: prior_candidates(ws, name) for name in names})


def working_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) after downscaling so the longer side is at most ``max_side`` (never upscaled)."""
    s = min(1.0, max_side / max(width, height)) if max_side > 0 else 1.0
    return max(1, round(width * s)), max(1, round(height * s))


def working_intrinsics(view: View, size: tuple[int, int]) -> np.ndarray:
    """``K`` of ``view`` at working size (width, height) (COLMAP convention: exact)."""
    return scale_intrinsics(view.K, size[0] / view.width, size[1] / view.height)


# ---- neighbours and depth range -------------------------------------------------------------------

def select_neighbors(scene: SfmScene, k: int, good_angle_deg: float, max_angle_deg: float) -> list[list[int]]:
    """Per view, up to ``k`` neighbour indices, best first.

    Score of ``j`` for reference ``i``: shared sparse points × min(1, θ / good_angle)
    where θ is the median triangulation angle of those points seen from the two
    camera centres; views sharing no point, or with θ > ``max_angle_deg``, are out.
    Only the ``4k`` most co-visible views are scored (the angle weight is ≤ 1).
    """
    covis = scene.covisibility()
    centers = np.stack([v.center for v in scene.views]) if scene.views else np.zeros((0, 3))
    out = []
    for i, vi in enumerate(scene.views):
        scores = []
        # Angles only for the most co-visible candidates (the angle weight is at most 1).
        order = [j for j in np.argsort(-covis[i], kind="stable") if j != i and covis[i, j] > 0][: 4 * k]
        for j in order:
            shared = np.intersect1d(vi.point_ids, scene.views[j].point_ids, assume_unique=True)
            X = scene.points[shared]
            a = X - centers[i]
            b = X - centers[j]
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            theta = float(np.degrees(np.median(np.arccos(np.clip(cos, -1.0, 1.0)))))
            if theta > max_angle_deg or theta <= 0:
                continue
            scores.append((len(shared) * min(1.0, theta / max(good_angle_deg, 1e-9)), int(j)))
        scores.sort(key=lambda s: (-s[0], s[1]))
        out.append([j for _, j in scores[:k]])
    return out


def depth_range(scene: SfmScene, view: View, percentile: float, margin: float) -> tuple[float, float]:
    """(near, far) of the sweep from the depths of the sparse points ``view`` sees.

    Raises:
        ViewFailure: the view sees no sparse point in front of it.
    """
    ids = view.point_ids
    X = scene.points[ids] if len(ids) else np.zeros((0, 3))
    z = X @ view.cam_from_world[2, :3] + view.cam_from_world[2, 3]
    z = z[np.isfinite(z) & (z > 0)]
    if len(z) < 2:
        raise ViewFailure(f"{view.name}: sees {len(z)} sparse point(s) in front of the camera; cannot set a depth range")
    near, far = np.percentile(z, [percentile, 100.0 - percentile])
    return float(near / (1.0 + margin)), float(max(far, near * 1.01) * (1.0 + margin))


def fit_scene_planes(points: np.ndarray, max_planes: int, distance_fraction: float, min_inlier_fraction: float,
                     seed: int = 0) -> list[np.ndarray]:
    """Dominant planes of the sparse points: up to ``max_planes`` ``(n, d)`` (4,) with ``n·X + d = 0``, ``|n| = 1``.

    Sequential RANSAC (Open3D ``segment_plane``): fit, remove the inliers,
    repeat. The inlier distance is ``distance_fraction`` × the diagonal of the
    points' 2-98 percentile box; a plane is kept only when at least
    ``min_inlier_fraction`` of all the points lie on it. Each RANSAC plane is
    then refitted by least squares to its inliers until they stop changing:
    RANSAC's multithreaded sampling differs with the thread count, the
    refitted plane does not (the depth maps must not depend on how many
    threads a worker has).
    """
    if max_planes <= 0 or len(points) < 50:
        return []
    points = np.asarray(points, dtype=np.float64)
    lo, hi = np.percentile(points, [2, 98], axis=0)
    distance = distance_fraction * float(np.linalg.norm(hi - lo))
    if distance <= 0:
        return []
    import open3d as o3d  # here, not at import: the stage's other passes (and a GPU machine without Open3D) do not need it

    o3d.utility.random.seed(seed)
    remaining = points
    planes = []
    for _ in range(max_planes):
        if len(remaining) < max(3, min_inlier_fraction * len(points)):
            break
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(remaining))
        model, _ = cloud.segment_plane(distance_threshold=distance, ransac_n=3, num_iterations=1000)
        plane, inliers = refit_plane(remaining, np.asarray(model, dtype=np.float64), distance)
        if inliers.sum() < min_inlier_fraction * len(points):
            break
        planes.append(plane)
        remaining = remaining[~inliers]
    return planes


def refit_plane(points: np.ndarray, plane: np.ndarray, distance: float, max_iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane (4,) through the points within ``distance`` of ``plane``, repeated until the inliers settle.

    Returns the plane (unit normal, sign fixed so that its largest component is positive) and the inlier mask (N,).
    """
    plane = plane / np.linalg.norm(plane[:3])
    inliers = np.abs(points @ plane[:3] + plane[3]) < distance
    for _ in range(max_iterations):
        if inliers.sum() < 3:
            break
        centroid = points[inliers].mean(axis=0)
        normal = np.linalg.svd(points[inliers] - centroid, full_matrices=False)[2][2]
        normal = normal * np.sign(normal[np.argmax(np.abs(normal))])
        plane = np.concatenate([normal, [-normal @ centroid]])
        updated = np.abs(points @ plane[:3] + plane[3]) < distance
        if np.array_equal(updated, inliers):
            break
        inliers = updated
    return plane, inliers


def plane_in_camera(plane_world: np.ndarray, cam_from_world: np.ndarray) -> np.ndarray:
    """The plane ``(n, d)`` (``n·X + d = 0``, world frame) in the frame of the camera ``cam_from_world`` (4x4)."""
    R, t = cam_from_world[:3, :3], cam_from_world[:3, 3]
    n_cam = R @ plane_world[:3]
    return np.concatenate([n_cam, [plane_world[3] - n_cam @ t]])


def sparse_in_view(scene: SfmScene, view: View, K: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (N, 2) at working size and depths (N,) of the sparse points ``view`` observes."""
    X = scene.points[view.point_ids] if len(view.point_ids) else np.zeros((0, 3))
    uv, z, ok = anchoring.project_points(X, K, view.cam_from_world, size[1], size[0])
    return uv[ok], z[ok]


# ---- images ---------------------------------------------------------------------------------------

class _LRU:
    """A small least-recently-used cache (bounded memory while streaming views)."""

    def __init__(self, capacity: int, load: Callable[[int], Any]):
        self.capacity = max(1, capacity)
        self.load = load
        self.items: OrderedDict[int, Any] = OrderedDict()

    def get(self, key: int) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.load(key)
        self.items[key] = value
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return value


def load_image_tensor(view: View, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """RGB (1, 3, h, w) float32 in [0, 1] at working size (width, height) = ``size``."""
    rgb = load_rgb(view.image_path)
    t = torch.from_numpy(np.array(rgb, copy=True)).to(device=device, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    return mvs.resize_image(t, size[1], size[0])


# ---- estimators ------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """A raw map of one view before anchoring."""

    values: np.ndarray
    """(H, W) float32 depth or inverse depth (``domain``)."""
    valid: np.ndarray
    """(H, W) bool."""
    confidence: np.ndarray
    """(H, W) float32 in [0, 1]."""
    K: np.ndarray
    """3x3 at (H, W)."""
    domain: str
    affine: bool
    stats: dict = field(default_factory=dict)


class Estimator(Protocol):
    def estimate(self, index: int) -> Estimate:
        """Raw map of view ``index``; raises :class:`ViewFailure` when it cannot."""
        ...


class MvsEstimator:
    """Plane-sweep stereo against co-visible neighbours (:func:`pipeline.depth.plane_sweep.estimate_depth`)."""

    def __init__(self, scene: SfmScene, cfg: DepthConfig, device: torch.device):
        check_section(cfg, "depth")
        self.scene = scene
        self.cfg = cfg
        self.device = device
        self.neighbors = select_neighbors(scene, cfg.num_neighbors, cfg.neighbor_angle_deg, cfg.max_neighbor_angle_deg)
        self.sizes = [working_size(v.width, v.height, cfg.max_image_side) for v in scene.views]
        self.planes = fit_scene_planes(scene.points, cfg.plane_candidates, cfg.plane_distance, cfg.plane_min_inliers)
        self.images = _LRU(cfg.cache_images, lambda i: mvs.rgb_to_gray(load_image_tensor(scene.views[i], self.sizes[i], device)))
        self.settings = mvs.SweepSettings(
            num_hypotheses=cfg.num_hypotheses, levels=cfg.pyramid_levels, refine_hypotheses=cfg.refine_hypotheses,
            refine_radius=cfg.refine_radius, edge_radius=cfg.edge_radius, propagation_shifts=tuple(cfg.propagation_shifts), polish_hypotheses=cfg.polish_hypotheses, polish_iterations=cfg.polish_iterations,
            smooth_radius=cfg.smooth_radius, offset_penalty=cfg.offset_penalty, window=cfg.ncc_window, plane_max_gap=cfg.plane_max_gap, best_k=cfg.best_k, truncation=cfg.cost_truncation, min_ncc=cfg.min_ncc,
            chunk_pixels=max(1, cfg.chunk_pixels),
        )

    def sources(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Matching neighbours of view ``index``: (grayscale images, working intrinsics, ``src_from_ref`` poses)."""
        view = self.scene.views[index]
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        src_images, K_srcs, poses = [], [], []
        for j in self.neighbors[index]:
            vj = self.scene.views[j]
            src_images.append(self.images.get(j))
            K_srcs.append(t(working_intrinsics(vj, self.sizes[j])))
            poses.append(t(vj.cam_from_world @ invert_pose(view.cam_from_world)))
        return src_images, K_srcs, poses

    def estimate(self, index: int) -> Estimate:
        view = self.scene.views[index]
        nbrs = self.neighbors[index]
        if not nbrs:
            raise ViewFailure(f"{view.name}: no neighbour view shares sparse points at a usable triangulation angle")
        near, far = depth_range(self.scene, view, self.cfg.range_percentile, self.cfg.range_margin)
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        K_ref = working_intrinsics(view, self.sizes[index])
        src_images, K_srcs, poses = self.sources(index)
        ref = self.images.get(index)
        planes_cam = [t(plane_in_camera(plane, view.cam_from_world)) for plane in self.planes]

        def sweep(chunk_pixels: int, device: torch.device) -> mvs.SweepResult:
            to = lambda x: x.to(device)  # noqa: E731
            settings = dataclasses.replace(self.settings, chunk_pixels=chunk_pixels)
            with torch.no_grad():
                return mvs.estimate_depth(to(ref), to(t(K_ref)), [to(x) for x in src_images], [to(x) for x in K_srcs],
                                          [to(x) for x in poses], near, far, settings, planes_cam=[to(x) for x in planes_cam])

        # chunk_pixels only bounds memory (same result): on out-of-memory, smaller chunks, then the CPU.
        res = call_with_oom_fallback(sweep, batch=self.settings.chunk_pixels, device=self.device, what=f"depth of {view.name}",
                                     setting="depth.chunk_pixels", min_batch=min(self.settings.chunk_pixels, 1 << 14)).value
        valid = res.valid.cpu().numpy()
        stats = {
            "near": near,
            "far": far,
            "neighbors": [self.scene.views[j].name for j in nbrs],
            "mean_ncc": float(res.ncc[res.valid].mean()) if bool(res.valid.any()) else 0.0,
        }
        return Estimate(values=res.depth.cpu().numpy(), valid=valid, confidence=res.confidence.cpu().numpy(), K=K_ref,
                        domain=anchoring.DEPTH, affine=False, stats=stats)


def read_prior_file(path: Path) -> np.ndarray:
    """A prior map as float64 (H, W): ``.npy`` (float, (H, W) or with a singleton axis) or 16-bit ``.png``.

    Raises:
        ViewFailure: unreadable, not 2-D, or holds NaN/inf.
    """
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                if im.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
                    raise ViewFailure(f"{path}: PNG priors must be 16-bit single-channel (got mode {im.mode})")
                arr = np.asarray(im)
    except ViewFailure:
        raise
    except (OSError, ValueError) as exc:
        raise ViewFailure(f"{path}: cannot read the prior ({exc})") from exc
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise ViewFailure(f"{path}: the prior must hold numbers (dtype {arr.dtype})")
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ViewFailure(f"{path}: the prior has shape {np.shape(arr)}; expected (H, W)")
    arr = arr.astype(np.float64)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise ViewFailure(f"{path}: the prior holds {bad} NaN/inf value(s); write 0 for unknown pixels")
    return arr


def resize_map(values_hw: np.ndarray, valid_hw: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resize of a map with a validity mask to (width, height); a pixel stays valid only if all its taps were."""
    w, h = size
    if values_hw.shape == (h, w):
        return values_hw.astype(np.float32), valid_hw.astype(bool)
    v = torch.from_numpy(np.where(valid_hw, values_hw, 0.0).astype(np.float32))[None, None]
    m = torch.from_numpy(valid_hw.astype(np.float32))[None, None]
    vr = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    mr = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    ok = mr > 0.999
    return np.where(ok, vr / np.maximum(mr, 1e-6), 0.0).astype(np.float32), ok


def _check_aspect(shape_hw: tuple[int, int], view: View, what: str) -> None:
    h, w = shape_hw
    if abs(w / h - view.width / view.height) > 0.01 * view.width / view.height:
        raise ViewFailure(f"{what}: shape {h}x{w} (HxW) does not match the image {view.name} ({view.height}x{view.width}); "
                          "supply a map of the image's size or aspect ratio")


class PriorEstimator:
    """User-supplied maps ``SCENE_DIR/depth_prior/<image name or stem>.npy|.png`` (see :func:`prior_candidates`)."""

    def __init__(self, scene: SfmScene, ws: Workspace, cfg: DepthConfig):
        self.scene, self.ws, self.cfg = scene, ws, cfg
        if not ws.depth_prior_dir.is_dir():
            raise ReconError(f"{ws.depth_prior_dir}: folder of depth priors not found; add <image stem>.npy files there or set depth.estimator=mvs")
        self.candidates = unambiguous_prior_candidates(ws, [v.name for v in scene.views])

    def estimate(self, index: int) -> Estimate:
        view = self.scene.views[index]
        path = next((p for p in self.candidates[view.name] if p.is_file()), None)
        if path is None:
            shared = [p for p in prior_candidates(self.ws, view.name) if p.is_file() and p not in self.candidates[view.name]]
            if shared:
                raise ViewFailure(f"{shared[0]}: this prior fits more than one image ({view.name} among them); "
                                  f"name it {self.ws.depth_prior_dir / view.name}.npy")
            flat = self.ws.depth_prior_dir / view_stem(view.name)
            raise ViewFailure(f"{flat}.npy: no prior for image {view.name} (.npy or 16-bit .png, named {view_stem(view.name)}, "
                              f"or {view.name} plus the suffix)")
        arr = read_prior_file(path)
        _check_aspect(arr.shape, view, str(path))
        size = working_size(view.width, view.height, self.cfg.max_image_side)
        values, valid = resize_map(arr, arr > 0, size)
        return Estimate(values=values, valid=valid, confidence=valid.astype(np.float32), K=working_intrinsics(view, size),
                        domain=self.cfg.prior_kind.value, affine=self.cfg.prior_affine, stats={"source": str(path)})


class TorchScriptEstimator:
    """A TorchScript model: RGB (1, 3, H, W) in [0, 1] → depth or inverse depth."""

    def __init__(self, scene: SfmScene, cfg: DepthConfig, device: torch.device):
        self.scene, self.cfg, self.device = scene, cfg, device
        path = Path(cfg.torchscript_path).expanduser()
        if not cfg.torchscript_path or not path.is_file():
            raise ReconError(f"{path if cfg.torchscript_path else '(empty)'}: TorchScript model not found; set depth.torchscript_path to a model file")
        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it is what this estimator reads
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ReconError(f"{path}: not a TorchScript model ({str(exc).splitlines()[0]}); export one with torch.jit.script/trace and save()") from exc
        self.path = path

    def estimate(self, index: int) -> Estimate:
        view = self.scene.views[index]
        size = working_size(view.width, view.height, self.cfg.max_image_side)
        image = load_image_tensor(view, size, self.device)
        try:
            with torch.no_grad():
                out = self.model(image)
        except Exception as exc:  # a user model can raise anything
            raise ViewFailure(f"{self.path}: the model failed on {view.name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if not isinstance(out, torch.Tensor):
            raise ViewFailure(f"{self.path}: the model returned {type(out).__name__} for {view.name}; expected a tensor")
        arr = out.detach().float().cpu().numpy()
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise ViewFailure(f"{self.path}: output of shape {tuple(out.shape)} for {view.name}; expected (1, 1, H, W), (1, H, W) or (H, W)")
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise ViewFailure(f"{self.path}: output for {view.name} holds {bad} NaN/inf value(s)")
        _check_aspect(arr.shape, view, f"{self.path} output")
        values, valid = resize_map(arr.astype(np.float64), arr > 0, size)
        return Estimate(values=values, valid=valid, confidence=valid.astype(np.float32), K=working_intrinsics(view, size),
                        domain=self.cfg.prior_kind.value, affine=self.cfg.prior_affine, stats={"source": str(self.path)})


def make_estimator(scene: SfmScene, ws: Workspace, cfg: DepthConfig, device: torch.device) -> Estimator:
    if cfg.estimator == DepthEstimator.mvs:
        return MvsEstimator(scene, cfg, device)
    if cfg.estimator == DepthEstimator.prior:
        return PriorEstimator(scene, ws, cfg)
    if cfg.estimator == DepthEstimator.torchscript:
        return TorchScriptEstimator(scene, cfg, device)
    raise ReconError(f"depth.estimator: unknown estimator {cfg.estimator!r}")


# ---- anchoring --------------------------------------------------------------------------------------

def anchor_estimate(est: Estimate, scene: SfmScene, view: View, cfg: DepthConfig, log: logging.Logger) -> tuple[np.ndarray, np.ndarray, dict]:
    """Align a raw map to the sparse points of its view: (depth (H, W) float32, valid (H, W), stats).

    mvs maps (metric already) are rescaled only when the fitted scale is off by
    more than ``mvs_rescale_tolerance``; prior/torchscript maps are always aligned.

    Raises:
        ViewFailure: a prior/torchscript map that cannot be anchored.
    """
    h, w = est.values.shape
    uv, z = sparse_in_view(scene, view, est.K, (w, h))
    is_mvs = cfg.estimator == DepthEstimator.mvs
    try:
        res = anchoring.anchor(est.values, est.valid, uv, z, domain=est.domain, affine=est.affine, min_points=cfg.min_anchor_points)
    except anchoring.AnchorError as exc:
        if is_mvs:
            log.warning("%s: depth map not checked against the sparse points (%s); kept unscaled", view.name, exc)
            depth = np.where(est.valid, est.values, 0).astype(np.float32)
            return depth, est.valid.copy(), {"applied": False, "error": str(exc)}
        source = est.stats.get("source", view.name)
        raise ViewFailure(f"{source}: cannot anchor the map of {view.name} to the sparse points: {exc}") from exc
    stats = res.as_dict()
    if is_mvs:
        apply = abs(res.scale - 1.0) > cfg.mvs_rescale_tolerance
        if apply:
            log.warning("%s: mvs depth is off the sparse points by scale %.3f (median error %.1f %%); rescaled — check the SfM poses",
                        view.name, res.scale, 100 * res.residual_before)
        else:
            stats["residual_after"] = stats["residual_before"]
        stats["applied"] = apply
        if not apply:
            depth = np.where(est.valid, est.values, 0).astype(np.float32)
            return depth, est.valid.copy(), stats
    else:
        stats["applied"] = True
    depth, valid = anchoring.apply_anchor(est.values, est.valid, res)
    return depth, valid, stats


# ---- the two passes ---------------------------------------------------------------------------------

BarFactory = Callable[..., tqdm]


def _no_bar(**kwargs: Any) -> tqdm:
    return tqdm(disable=True, **kwargs)


@dataclass
class DepthRunResult:
    """What :func:`compute_depth_maps` did (for the run summary)."""

    written: list[str]
    """Views with a final map (written now or already there)."""
    failed: dict[str, str]
    """View name → why it was left out."""
    seconds: list[float]
    """Wall seconds of each view estimated in this run (pass 1)."""
    cpu_seconds: list[float]
    filter_seconds: float = 0.0
    candidates_seconds: float = 0.0
    valid_fraction: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "views": len(self.written),
            "failed": len(self.failed),
            "mean_valid_fraction": round(float(np.mean(self.valid_fraction)), 4) if self.valid_fraction else None,
            "seconds_per_view": round(float(np.mean(self.seconds)), 3) if self.seconds else None,
            "cpu_seconds_per_view": round(float(np.mean(self.cpu_seconds)), 3) if self.cpu_seconds else None,
            "filter_seconds": round(self.filter_seconds, 3),
            "candidates_seconds": round(self.candidates_seconds, 3),
        }


def uses_two_passes(cfg: DepthConfig) -> bool:
    """True when pass 1 writes raw maps that later passes (cross-view candidates, geometric filter) turn into the final ones."""
    return cfg.estimator == DepthEstimator.mvs and (cfg.geometric_filter or cfg.cross_view_candidates)


def filter_input_path(ws: Workspace, cfg: DepthConfig, image_name: str) -> Path:
    """The map the geometric filter reads: after cross-view candidates when those run, else the raw map."""
    return adopted_depth_path(ws, image_name) if cfg.cross_view_candidates else raw_depth_path(ws, image_name)


def first_pass_path(ws: Workspace, cfg: DepthConfig, image_name: str) -> Path:
    """Where pass 1 writes the map of ``image_name`` (raw map when a filter pass follows, else the final map)."""
    return raw_depth_path(ws, image_name) if uses_two_passes(cfg) else ws.depth_view(image_name)


def estimate_views(scene: SfmScene, ws: Workspace, cfg: DepthConfig, indices: list[int] | None = None, *,
                   bar: BarFactory = _no_bar, log: logging.Logger = logger) -> DepthRunResult:
    """Pass 1 for the views ``indices`` of ``scene`` (all when None): estimate and anchor, one file per view.

    Views whose pass-1 file exists are skipped, so this is resumable and can be
    split over workers (e.g. Ray tasks) sharing the workspace: every view's file
    depends only on the scene, the inputs and ``cfg``, never on which worker made it.
    Only ``seconds``/``cpu_seconds``/``failed`` of the result are filled.
    """
    device = default_device(cfg.device)
    wanted = range(len(scene.views)) if indices is None else indices
    result = DepthRunResult(written=[], failed={}, seconds=[], cpu_seconds=[])
    todo = [i for i in wanted if not first_pass_path(ws, cfg, scene.views[i].name).exists()]
    estimator = make_estimator(scene, ws, cfg, device) if todo else None
    with bar(desc="depth maps", total=len(wanted), unit="view") as pbar:
        pbar.update(len(wanted) - len(todo))
        for i in todo:
            view = scene.views[i]
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                assert estimator is not None
                est = estimator.estimate(i)
                depth, valid, anchor_stats = anchor_estimate(est, scene, view, cfg, log)
            except ViewFailure as exc:
                log.warning("depth: %s; view left out", exc)
                result.failed[view.name] = str(exc)
                pbar.update(1)
                continue
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            stats = {
                "estimator": cfg.estimator.value,
                "anchoring": anchor_stats,
                "valid_fraction": float(valid.mean()),
                "seconds": seconds,
                "cpu_seconds": cpu,
                **est.stats,
            }
            confidence = np.where(valid, est.confidence, 0.0).astype(np.float32)
            save_depth_map(first_pass_path(ws, cfg, view.name),
                           DepthMap(name=view.name, depth=depth, confidence=confidence, valid=valid,
                                    K=est.K, cam_from_world=view.cam_from_world, stats=stats))
            result.seconds.append(seconds)
            result.cpu_seconds.append(cpu)
            pbar.set_postfix(valid=f"{valid.mean():.2f}", s_per_view=f"{np.mean(result.seconds):.2f}", scale=f"{anchor_stats.get('scale', 1.0):.3f}")
            pbar.update(1)
    return result


def compute_depth_maps(scene: SfmScene, ws: Workspace, cfg: DepthConfig, *, bar: BarFactory = _no_bar,
                       log: logging.Logger = logger) -> DepthRunResult:
    """Estimate, anchor (and filter) a depth map per view of ``scene``; writes ``ws.depth_view`` files.

    Views whose file exists are skipped (per pass). Raises ReconError when no view gets a map.
    """
    if not scene.views:
        raise ReconError("the SfM model has no registered views; nothing to estimate depth for")
    device = default_device(cfg.device)
    two_pass = uses_two_passes(cfg)
    result = estimate_views(scene, ws, cfg, bar=bar, log=log)

    if two_pass and cfg.cross_view_candidates:
        t0 = time.perf_counter()
        adopted_path = (lambda name: adopted_depth_path(ws, name)) if cfg.geometric_filter else ws.depth_view
        _cross_view_pass(scene, ws, cfg, device, bar, adopted_path)
        result.candidates_seconds = time.perf_counter() - t0
    if two_pass and cfg.geometric_filter:
        t0 = time.perf_counter()
        _geometric_filter_pass(scene, ws, cfg, device, bar, result)
        result.filter_seconds = time.perf_counter() - t0

    estimated_now = bool(result.seconds)
    for v in scene.views:
        path = ws.depth_view(v.name)
        if path.exists():
            result.written.append(v.name)
            result.failed.pop(v.name, None)
            stats = load_depth_map(path).stats
            result.valid_fraction.append(float(stats.get("valid_fraction", 0.0)))
            if not estimated_now and "seconds" in stats:  # estimated earlier or by other workers: report their timing
                result.seconds.append(float(stats["seconds"]))
                result.cpu_seconds.append(float(stats.get("cpu_seconds", stats["seconds"])))
    if not result.written:
        reasons = "; ".join(list(result.failed.values())[:3])
        raise ReconError(f"no view got a depth map ({len(result.failed)} failed: {reasons}); fix the inputs or choose another depth.estimator")
    return result


def _cross_view_pass(scene: SfmScene, ws: Workspace, cfg: DepthConfig, device: torch.device, bar: BarFactory,
                     out_path: Callable[[str], Path]) -> None:
    """Pass 1b: raw maps → maps that also tried the neighbours' surfaces (:func:`pipeline.depth.plane_sweep.adopt_candidates`).

    Candidates come from the ``geo_neighbors`` views' raw maps splatted into
    the view; the matching cost uses the view's usual matching neighbours.
    Confidence becomes min(raw confidence, NCC of the kept depth), so an
    adopted surface is kept by the filter only when a neighbour agrees with it.
    """
    names = [v.name for v in scene.views]
    have_raw = [raw_depth_path(ws, n).exists() for n in names]
    todo = [i for i, n in enumerate(names) if have_raw[i] and not out_path(n).exists()]
    if not todo:
        return
    estimator = MvsEstimator(scene, cfg, device)
    geo_neighbors = select_neighbors(scene, cfg.geo_neighbors, cfg.neighbor_angle_deg, cfg.max_neighbor_angle_deg)
    maps = _LRU(cfg.cache_images, lambda i: load_depth_map(raw_depth_path(ws, names[i])))
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    with bar(desc="cross-view candidates", total=len(todo), unit="view") as pbar:
        for i in todo:
            dm = maps.get(i)
            h, w = dm.depth.shape
            with torch.no_grad():
                candidates = []
                for j in geo_neighbors[i]:
                    if have_raw[j]:
                        dj = maps.get(j)
                        candidates.append(mvs.splat_depth(t(dj.depth), t(dj.K), t(dm.K), t(dm.cam_from_world @ invert_pose(dj.cam_from_world)), h, w))
                src_images, K_srcs, poses = estimator.sources(i)
                depth, ncc, adopted = mvs.adopt_candidates(estimator.images.get(i), t(dm.K), src_images, K_srcs, poses,
                                                           t(dm.depth), candidates, estimator.settings)
            valid = (depth > 0).cpu().numpy()
            confidence = np.where(valid, np.minimum(dm.confidence, ncc.clamp(0.0, 1.0).cpu().numpy()), 0.0).astype(np.float32)
            stats = dict(dm.stats)
            stats["pass1_valid_fraction"] = stats.get("valid_fraction", 0.0)
            stats["valid_fraction"] = float(valid.mean())
            stats["cross_view"] = {"candidate_views": len(candidates), "adopted_fraction": float(adopted.float().mean())}
            save_depth_map(out_path(dm.name), DepthMap(name=dm.name, depth=depth.cpu().numpy(), confidence=confidence, valid=valid,
                                                       K=dm.K, cam_from_world=dm.cam_from_world, stats=stats))
            pbar.set_postfix(adopted=f"{float(adopted.float().mean()):.2f}")
            pbar.update(1)


def _geometric_filter_pass(scene: SfmScene, ws: Workspace, cfg: DepthConfig, device: torch.device, bar: BarFactory,
                           result: DepthRunResult) -> None:
    """Pass 2: raw maps → filtered maps (``ws.depth_view``), skipping views already filtered."""
    names = [v.name for v in scene.views]
    have_raw = [filter_input_path(ws, cfg, n).exists() for n in names]
    geo_neighbors = select_neighbors(scene, cfg.geo_neighbors, cfg.neighbor_angle_deg, cfg.max_neighbor_angle_deg)
    todo = [i for i, n in enumerate(names) if have_raw[i] and not ws.depth_view(n).exists()]
    if not todo:
        return
    maps = _LRU(cfg.cache_images, lambda i: load_depth_map(filter_input_path(ws, cfg, names[i])))
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    with bar(desc="consistency filter", total=len(todo), unit="view") as pbar:
        for i in todo:
            dm = maps.get(i)
            nbrs = [j for j in geo_neighbors[i] if have_raw[j]]
            neighbours = []
            for j in nbrs:
                dj = maps.get(j)
                neighbours.append((t(dj.depth), t(dj.K), t(dj.cam_from_world @ invert_pose(dm.cam_from_world))))
            with torch.no_grad():
                cons = mvs.geometric_consistency(t(dm.depth), t(dm.K), neighbours, cfg.geo_max_reproj_px, cfg.geo_max_rel_depth,
                                                 cfg.geo_free_space_margin)
            agreed = (cons.count >= cfg.geo_min_consistent).cpu().numpy()
            unverified = ((cons.count == 0) & (cons.violations == 0)).cpu().numpy() & (dm.confidence >= cfg.geo_unverified_min_confidence)
            keep = (agreed | unverified) & dm.valid
            depth = (cons.mean_depth.cpu().numpy() if cfg.geo_average else dm.depth)
            depth = np.where(keep, depth, 0.0).astype(np.float32)
            stats = dict(dm.stats)
            stats["raw_valid_fraction"] = stats.get("valid_fraction", 0.0)
            stats["valid_fraction"] = float(keep.mean())
            stats["geometric_filter"] = {"neighbors_checked": len(neighbours), "kept_of_valid": float(keep.sum() / max(1, dm.valid.sum())),
                                         "unverified_of_kept": float((unverified & keep).sum() / max(1, keep.sum()))}
            save_depth_map(ws.depth_view(dm.name), DepthMap(name=dm.name, depth=depth, confidence=np.where(keep, dm.confidence, 0.0),
                                                            valid=keep, K=dm.K, cam_from_world=dm.cam_from_world, stats=stats))
            pbar.set_postfix(kept=f"{keep.mean():.2f}")
            pbar.update(1)


def run(ctx: StageContext) -> None:
    """Initial depth of every registered view (see the module docstring)."""
    cfg: DepthConfig = ctx.settings
    scene = load_sfm_scene(ctx.ws)
    res = compute_depth_maps(scene, ctx.ws, cfg, bar=ctx.bar, log=ctx.logger)
    ctx.summary.update(res.summary())
    ctx.summary["estimator"] = cfg.estimator.value
    if res.failed:
        ctx.summary["left_out"] = sorted(res.failed)
    ctx.logger.info("depth maps of %d view(s) (%d left out), mean valid fraction %s, %s s per view",
                    len(res.written), len(res.failed), ctx.summary["mean_valid_fraction"], ctx.summary["seconds_per_view"])
