"""The depth estimators behind :class:`Estimator`: plane sweep (``mvs``), user priors (``prior``), a TorchScript model.

Each turns one view into a raw map (:class:`Estimate`) before anchoring; :func:`make_estimator` picks one from
``depth.estimator``. The stage (:mod:`pipeline.depth.stage`) anchors, writes and filters the maps.
"""

from __future__ import annotations

import dataclasses
import math
import threading
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

from pipeline.core.errors import ReconError
from pipeline.core.io import SfmScene, View, claim_files, load_rgb
from pipeline.core.oom import call_with_oom_fallback
from pipeline.core.poses import invert_pose
from pipeline.core.settings import check_section
from pipeline.core.workspace import Workspace, view_stem
from pipeline.depth import anchoring, coarse_to_fine
from pipeline.depth import plane_sweep as mvs
from pipeline.depth.config import DepthConfig, DepthEstimator, MvsConfig
from pipeline.depth.views import (
    ViewFailure,
    depth_range,
    fit_scene_planes,
    plane_in_camera,
    resolution_scale,
    resolve_max_image_side,
    scaled_pixels,
    scaled_window,
    stereo_neighbors,
    working_intrinsics,
    working_size,
)

# ---- prior files ----------------------------------------------------------------------------------

def prior_candidates(ws: Workspace, image_name: str) -> list[Path]:
    """Files a user may supply as the prior of an image, in order, each as ``.npy`` then ``.png``:
    ``depth_prior/<image name>`` (``a/b.jpg.npy``), the name without its extension (``a/b.npy``),
    then the flat stem (``a__b.npy``)."""
    no_ext = image_name.rsplit(".", 1)[0] if "." in Path(image_name).name else image_name
    stems = dict.fromkeys([image_name, no_ext, view_stem(image_name)])
    return [ws.depth_prior_dir / f"{stem}{ext}" for stem in stems for ext in (".npy", ".png")]


def unambiguous_prior_candidates(ws: Workspace, names: Sequence[str]) -> dict[str, list[Path]]:
    """:func:`prior_candidates` of every image, less the files two images would share (``a.npy`` for ``a.jpg``
    and ``a.png``, see :func:`pipeline.core.io.claim_files`), so one photo's depth is never fused with another's
    colours."""
    return claim_files({name: prior_candidates(ws, name) for name in names})


# ---- images ---------------------------------------------------------------------------------------

class _LRU:
    """A small least-recently-used cache (bounded memory while streaming views)."""

    def __init__(self, capacity: int, load: Callable[[int], Any]):
        self.capacity = max(1, capacity)
        self.load = load
        self.items: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()  # shared by the view threads of pipeline.core.workers

    def get(self, key: int) -> Any:
        with self._lock:
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


def sweep_settings(mvs_cfg: MvsConfig, scale: float = 1.0) -> coarse_to_fine.SweepSettings:
    """The plane sweep's settings from the ``mvs`` section, for maps ``scale`` (≥ 1) times ``depth.reference_side``.

    The settings in pixels grow with the maps, so a window or a propagation
    step covers the same part of the scene at any resolution: the NCC window
    (:func:`~pipeline.depth.views.scaled_window`), the propagation shifts and
    the median-filter radius times ``scale``, and one more pyramid level per
    doubling (the full sweep stays at about the same size in pixels). The
    consistency filter's tolerance is scaled where it is used. ``scale`` 1
    gives the section as set.
    """
    window, shifts, smooth, levels = (mvs_cfg.ncc_window, tuple(mvs_cfg.propagation_shifts), mvs_cfg.smooth_radius,
                                      mvs_cfg.pyramid_levels)
    if scale > 1.0:
        window = scaled_window(window, scale)
        shifts = tuple(scaled_pixels(s, scale) for s in shifts)
        smooth = scaled_pixels(smooth, scale)
        levels += scaled_pixels(math.log2(scale), 1.0)
    return coarse_to_fine.SweepSettings(
        num_hypotheses=mvs_cfg.num_hypotheses, levels=levels, refine_hypotheses=mvs_cfg.fine_hypotheses,
        refine_radius=mvs_cfg.fine_radius, edge_radius=mvs_cfg.edge_radius, propagation_shifts=shifts,
        polish_hypotheses=mvs_cfg.polish_hypotheses, polish_iterations=mvs_cfg.polish_iterations,
        smooth_radius=smooth, offset_penalty=mvs_cfg.offset_penalty, window=window,
        plane_max_gap=mvs_cfg.plane_max_gap, best_k=mvs_cfg.best_k, truncation=mvs_cfg.cost_truncation,
        min_ncc=mvs_cfg.min_ncc, chunk_pixels=max(1, mvs_cfg.chunk_pixels),
    )


class MvsEstimator:
    """Plane-sweep stereo against co-visible neighbours (:func:`pipeline.depth.coarse_to_fine.estimate_depth`)."""

    def __init__(self, scene: SfmScene, cfg: DepthConfig, mvs_cfg: MvsConfig, device: torch.device):
        check_section(cfg, "depth")
        check_section(mvs_cfg, "mvs")
        self.scene = scene
        self.cfg = cfg
        self.mvs_cfg = mvs_cfg
        self.device = device
        self.neighbors = stereo_neighbors(scene, mvs_cfg.num_neighbors, mvs_cfg.neighbor_angle_deg,
                                          mvs_cfg.max_neighbor_angle_deg)
        side = resolve_max_image_side(cfg.max_image_side, str(device))
        self.sizes = [working_size(v.width, v.height, side) for v in scene.views]
        self.planes = fit_scene_planes(scene.points, mvs_cfg.plane_candidates, mvs_cfg.plane_distance,
                                       mvs_cfg.plane_min_inliers)
        self.images = _LRU(cfg.cache_images,
                           lambda i: mvs.rgb_to_gray(load_image_tensor(scene.views[i], self.sizes[i], device)))

    def settings_for(self, index: int) -> coarse_to_fine.SweepSettings:
        """The sweep's settings for view ``index``, its pixel-sized ones scaled to its working size
        (:func:`sweep_settings`)."""
        return sweep_settings(self.mvs_cfg, resolution_scale(self.sizes[index], self.cfg.reference_side))

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
        near, far = depth_range(self.scene, view, self.mvs_cfg.range_percentile, self.mvs_cfg.range_margin)
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        K_ref = working_intrinsics(view, self.sizes[index])
        src_images, K_srcs, poses = self.sources(index)
        ref = self.images.get(index)
        planes_cam = [t(plane_in_camera(plane, view.cam_from_world)) for plane in self.planes]

        def sweep(chunk_pixels: int, device: torch.device) -> coarse_to_fine.SweepResult:
            to = lambda x: x.to(device)  # noqa: E731
            settings = dataclasses.replace(self.settings_for(index), chunk_pixels=chunk_pixels)
            with torch.no_grad():
                return coarse_to_fine.estimate_depth(to(ref), to(t(K_ref)), [to(x) for x in src_images],
                                                     [to(x) for x in K_srcs], [to(x) for x in poses], near, far,
                                                     settings, planes_cam=[to(x) for x in planes_cam])

        # chunk_pixels only bounds memory (same result): on out-of-memory, smaller chunks, then the CPU.
        chunk = max(1, self.mvs_cfg.chunk_pixels)
        res = call_with_oom_fallback(sweep, batch=chunk, device=self.device, what=f"depth of {view.name}",
                                     setting="mvs.chunk_pixels", min_batch=min(chunk, 1 << 14)).value
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
    """Bilinear resize of a map with a validity mask to (width, height); a pixel stays valid only if all its taps
    were."""
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
        raise ViewFailure(f"{what}: shape {h}x{w} (HxW) does not match the image {view.name} "
                          f"({view.height}x{view.width}); supply a map of the image's size or aspect ratio")


class PriorEstimator:
    """User-supplied maps ``SCENE_DIR/depth_prior/<image name or stem>.npy|.png`` (see :func:`prior_candidates`)."""

    def __init__(self, scene: SfmScene, ws: Workspace, cfg: DepthConfig):
        self.scene, self.ws, self.cfg = scene, ws, cfg
        if not ws.depth_prior_dir.is_dir():
            raise ReconError(f"{ws.depth_prior_dir}: folder of depth priors not found; add <image stem>.npy files "
                             "there or set depth.estimator=mvs")
        self.candidates = unambiguous_prior_candidates(ws, [v.name for v in scene.views])

    def estimate(self, index: int) -> Estimate:
        view = self.scene.views[index]
        path = next((p for p in self.candidates[view.name] if p.is_file()), None)
        if path is None:
            shared = [p for p in prior_candidates(self.ws, view.name)
                      if p.is_file() and p not in self.candidates[view.name]]
            if shared:
                raise ViewFailure(f"{shared[0]}: this prior fits more than one image ({view.name} among them); "
                                  f"name it {self.ws.depth_prior_dir / view.name}.npy")
            flat = self.ws.depth_prior_dir / view_stem(view.name)
            raise ViewFailure(f"{flat}.npy: no prior for image {view.name} (.npy or 16-bit .png, "
                              f"named {view_stem(view.name)}, or {view.name} plus the suffix)")
        arr = read_prior_file(path)
        _check_aspect(arr.shape, view, str(path))
        size = working_size(view.width, view.height, resolve_max_image_side(self.cfg.max_image_side, "cpu"))
        values, valid = resize_map(arr, arr > 0, size)
        return Estimate(values=values, valid=valid, confidence=valid.astype(np.float32),
                        K=working_intrinsics(view, size), domain=self.cfg.prior_kind.value,
                        affine=self.cfg.prior_affine, stats={"source": str(path)})


class TorchScriptEstimator:
    """A TorchScript model: RGB (1, 3, H, W) in [0, 1] → depth or inverse depth."""

    def __init__(self, scene: SfmScene, cfg: DepthConfig, device: torch.device):
        self.scene, self.cfg, self.device = scene, cfg, device
        path = Path(cfg.torchscript_path).expanduser()
        if not cfg.torchscript_path or not path.is_file():
            raise ReconError(f"{path if cfg.torchscript_path else '(empty)'}: TorchScript model not found; "
                             "set depth.torchscript_path to a model file")
        try:
            # torch >= 2.9 marks TorchScript deprecated; it is what this estimator reads
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ReconError(f"{path}: not a TorchScript model ({str(exc).splitlines()[0]}); "
                             "export one with torch.jit.script/trace and save()") from exc
        self.path = path

    def estimate(self, index: int) -> Estimate:
        view = self.scene.views[index]
        side = resolve_max_image_side(self.cfg.max_image_side, str(self.device))
        size = working_size(view.width, view.height, side)
        image = load_image_tensor(view, size, self.device)
        try:
            with torch.no_grad():
                out = self.model(image)
        except Exception as exc:  # a user model can raise anything
            raise ViewFailure(f"{self.path}: the model failed on {view.name} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if not isinstance(out, torch.Tensor):
            raise ViewFailure(f"{self.path}: the model returned {type(out).__name__} for {view.name}; "
                              "expected a tensor")
        arr = out.detach().float().cpu().numpy()
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise ViewFailure(f"{self.path}: output of shape {tuple(out.shape)} for {view.name}; "
                              "expected (1, 1, H, W), (1, H, W) or (H, W)")
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise ViewFailure(f"{self.path}: output for {view.name} holds {bad} NaN/inf value(s)")
        _check_aspect(arr.shape, view, f"{self.path} output")
        values, valid = resize_map(arr.astype(np.float64), arr > 0, size)
        return Estimate(values=values, valid=valid, confidence=valid.astype(np.float32),
                        K=working_intrinsics(view, size), domain=self.cfg.prior_kind.value,
                        affine=self.cfg.prior_affine, stats={"source": str(self.path)})


def make_estimator(scene: SfmScene, ws: Workspace, cfg: DepthConfig, mvs_cfg: MvsConfig,
                   device: torch.device) -> Estimator:
    if cfg.estimator == DepthEstimator.mvs:
        return MvsEstimator(scene, cfg, mvs_cfg, device)
    if cfg.estimator == DepthEstimator.prior:
        return PriorEstimator(scene, ws, cfg)
    if cfg.estimator == DepthEstimator.torchscript:
        return TorchScriptEstimator(scene, cfg, device)
    raise ReconError(f"depth.estimator: unknown estimator {cfg.estimator!r}")
