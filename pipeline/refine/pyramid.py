"""The δz pyramid of the refine stage and the groups of views that hold it.

A view's correction is a pyramid of log-depth grids summed coarse-to-fine
(:func:`upsample_sum`; ``depth_pred = depth_init · exp(Σ_l up(r_l))``). The
views are refined in interleaved groups (:func:`view_groups`); a group's
device tensors (fixed inputs, grids, Adam moments) are a :class:`_Group`,
and :class:`_GroupStore` keeps them in memory or, past
``refine.max_resident_views``, in raw-byte scratch files between turns (bit
for bit). :func:`sample_views` reads per-view maps (the neighbours' current
depth, their images) at pixel coordinates, each sample from its own view.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ---- reading per-view maps, the pyramid's coarse-to-fine sum ------------------------------

def sample_views(maps_vhwc: torch.Tensor, view_bn: torch.Tensor, uv_bn2: torch.Tensor,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Bilinear read of per-view maps at pixel coordinates, each sample from its own view.

    The same values as :func:`pipeline.core.geometry.sample_image` of map
    ``view_bn[b, n]`` at ``uv_bn2[b, n]`` (``align_corners=False``, border
    padding: pixel centres at +0.5, coordinates clamped to the border), done
    with four row gathers from the channels-last maps of all views instead of
    one ``grid_sample`` per view. Differentiable with respect to ``uv`` (the
    maps are read as constants; without ``decode``, through :class:`_BilinearRead`,
    whose backward pass is two products); the cost does not depend on the number of views.

    Args:
        maps_vhwc: (V, H, W, C) maps of all views, channels last.
        view_bn: (B, N) long view indices.
        uv_bn2: (B, N, 2) pixel coordinates in those views.
        decode: optional map of each tap's values (B, N, C) → (B, N, C'), applied
            before the interpolation (a compact storage read as more channels).
    Returns:
        (B, C, N), or (B, C', N) with ``decode``.
    """
    v, h, w, c = maps_vhwc.shape
    x = (uv_bn2[..., 0] - 0.5).clamp(0, w - 1)
    y = (uv_bn2[..., 1] - 0.5).clamp(0, h - 1)
    rows = maps_vhwc.detach().reshape(v * h * w, c)
    base = view_bn * (h * w)
    if decode is None and torch.is_grad_enabled() and x.requires_grad:
        return _BilinearRead.apply(rows, base, x, y, w, h).permute(0, 2, 1)
    return _bilinear(rows, base, x, y, w, h, decode)[0].permute(0, 2, 1)


def _bilinear(rows: torch.Tensor, base: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: int, h: int,
              decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
              slopes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`sample_views`' interpolation at clamped coordinates ``x, y`` (B, N): values (B, N, C) and, with
    ``slopes``, their derivatives along x and y (no decode)."""
    x0f, y0f = x.detach().floor(), y.detach().floor()
    ax, ay = (x - x0f)[..., None], (y - y0f)[..., None]  # (B, N, 1)
    x0, y0 = x0f.long(), y0f.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    c = rows.shape[1]
    flat = rows.reshape(-1) if c == 1 else rows  # one channel: a 1-D gather, several times faster on CPU

    def tap(index: torch.Tensor) -> torch.Tensor:
        values = flat.index_select(0, index.reshape(-1)).reshape(*base.shape, c)
        return values if decode is None else decode(values)

    i00 = base + y0 * w + x0
    dx, dy = x1 - x0, (y1 - y0) * w
    t00, t01, t10, t11 = tap(i00), tap(i00 + dx), tap(i00 + dy), tap(i00 + dy + dx)
    top = t00 * (1 - ax) + t01 * ax
    bottom = t10 * (1 - ax) + t11 * ax
    values = top * (1 - ay) + bottom * ay
    if not slopes:
        return values, None, None
    return values, (t01 - t00) * (1 - ay) + (t11 - t10) * ay, bottom - top


class _BilinearRead(torch.autograd.Function):
    """:func:`_bilinear` differentiable in ``x, y`` with a hand-written backward pass (the local slopes, saved by
    the forward pass), instead of autograd through a dozen products on every sample."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, base: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: int,  # type: ignore[override]
                h: int) -> torch.Tensor:
        values, d_dx, d_dy = _bilinear(rows, base, x, y, w, h, slopes=True)
        ctx.save_for_backward(d_dx, d_dy)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        d_dx, d_dy = ctx.saved_tensors
        return None, None, (grad * d_dx).sum(-1), (grad * d_dy).sum(-1), None, None


def upsample2x(x_b1hw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear ×2 upsampling (``align_corners=False``, border replicated), cropped to (height, width).

    Equal to ``F.interpolate(x, scale_factor=2, mode="bilinear")`` for even
    sizes; a coarse cell ``j`` covers fine pixels ``2j, 2j+1``. Written as
    shifted weighted sums (:func:`_upsample2x_values`), with a hand-written
    backward pass (:func:`_upsample2x_transpose`): both several times cheaper
    on CPU than ``upsample_bilinear2d``'s, and than autograd through the sums.
    """
    return _Upsample2x.apply(x_b1hw, height, width)


def _upsample2x_values(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    y = _upsample2x_along(x, x.dim() - 1)
    return _upsample2x_along(y, y.dim() - 2)[..., :height, :width]


def _upsample2x_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One of the last two axes (``dim``) of :func:`upsample2x`: ``out[2j] = 0.25 x[j-1] + 0.75 x[j]``, ``out[2j+1] =
    0.75 x[j] + 0.25 x[j+1]`` (border replicated), written straight into the interleaved output; 0.25 x is exact,
    so each value is rounded once, as in ``0.25 * a + 0.75 * b``."""
    n = x.shape[dim]
    xp = F.pad(x, (1, 1, 0, 0) if dim == x.dim() - 1 else (0, 0, 1, 1), mode="replicate")
    three_quarters = 0.75 * x
    out = x.new_empty(*x.shape[:dim + 1], 2, *x.shape[dim + 1:])
    torch.add(three_quarters, xp.narrow(dim, 0, n), alpha=0.25, out=out.select(dim + 1, 0))
    torch.add(three_quarters, xp.narrow(dim, 2, n), alpha=0.25, out=out.select(dim + 1, 1))
    return out.flatten(dim, dim + 1)


def _transpose_along(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Adjoint of one axis of the ×2 upsampling: fine ``(…, 2n, …)`` gradients → coarse ``(…, n, …)``.

    Fine pixel ``2j`` is ``0.25 x[j-1] + 0.75 x[j]`` and ``2j+1`` is
    ``0.75 x[j] + 0.25 x[j+1]`` (``x[-1] = x[0]``, ``x[n] = x[n-1]``), so
    ``x[j]`` collects ``0.75 (g[2j] + g[2j+1]) + 0.25 (g[2j+2] + g[2j-1])``,
    the missing neighbours at the borders replaced by the border's own.
    """
    even, odd = g.unflatten(dim, (-1, 2)).unbind(dim + 1)
    n = even.shape[dim]
    if n == 1:
        return (even + odd).mul_(0.75).add_(odd + even, alpha=0.25)
    # sides[j] = g[2j+2] + g[2j-1] (borders: g[2n-1], g[0]), written in three slices instead of two concatenations
    sides = torch.empty_like(even)
    torch.add(even.narrow(dim, 1, 1), even.narrow(dim, 0, 1), out=sides.narrow(dim, 0, 1))
    torch.add(even.narrow(dim, 2, n - 2), odd.narrow(dim, 0, n - 2), out=sides.narrow(dim, 1, n - 2))
    torch.add(odd.narrow(dim, n - 1, 1), odd.narrow(dim, n - 2, 1), out=sides.narrow(dim, n - 1, 1))
    # 0.25 · sides is exact, so this rounds as 0.75 (even + odd) + 0.25 sides does
    return (even + odd).mul_(0.75).add_(sides, alpha=0.25)


def _upsample2x_transpose(grad: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Gradient with respect to the (…, h, w) input of :func:`upsample2x`, from its output's (cropped) gradient."""
    full = F.pad(grad, (0, 2 * w - grad.shape[-1], 0, 2 * h - grad.shape[-2]))  # cropped pixels: no gradient
    return _transpose_along(_transpose_along(full, full.dim() - 2), full.dim() - 1)


class _Upsample2x(torch.autograd.Function):
    """:func:`upsample2x` with its exact adjoint as the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, height: int, width: int) -> torch.Tensor:  # type: ignore[override]
        ctx.coarse = x.shape[-2:]
        return _upsample2x_values(x, height, width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _upsample2x_transpose(grad, *ctx.coarse), None, None


def _upsample(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if 0 <= 2 * h - height <= 1 and 0 <= 2 * w - width <= 1:
        return upsample2x(x, height, width)
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


def upsample_sum(grids: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Coarse-to-fine sum of a pyramid: ``up(... up(up(g_n) + g_{n-1}) ...) + g_0`` at (height, width).

    ``grids`` are (B, 1, h_l, w_l) from fine to coarse; each partial sum is
    bilinearly upsampled to the next finer grid's size (×2 steps use
    :func:`upsample2x`, other ratios ``F.interpolate``), the finest to
    (height, width). Cascading costs about 1.3 full-resolution upsamplings
    whatever the number of levels.
    """
    total = grids[-1]
    for g in reversed(grids[:-1]):
        total = _upsample(total, *g.shape[-2:]) + g
    return _upsample(total, height, width)


def upsample_sum_pair(grids: Sequence[torch.Tensor], height: int, width: int,
                      n_fine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`upsample_sum` of ``grids``, and of the same grids with the ``n_fine`` finest detached.

    The coarse part of the cascade is computed once and shared: the values
    are those of two :func:`upsample_sum` calls, bit for bit, for about the
    cost of one.
    """
    if n_fine <= 0 or n_fine >= len(grids):
        total = upsample_sum(grids, height, width)
        return total, (total if n_fine <= 0 else upsample_sum([g.detach() for g in grids], height, width))
    shared = grids[-1]
    for g in reversed(grids[n_fine:-1]):
        shared = _upsample(shared, *g.shape[-2:]) + g
    shared = _upsample(shared, *grids[n_fine - 1].shape[-2:])
    both = []
    for fine in (grids[:n_fine], [g.detach() for g in grids[:n_fine]]):
        total = shared + fine[-1]
        for g in reversed(fine[:-1]):
            total = _upsample(total, *g.shape[-2:]) + g
        both.append(_upsample(total, height, width))
    return both[0], both[1]


# ---- groups of views ---------------------------------------------------------------------

def view_groups(num_views: int, views_per_batch: int) -> list[np.ndarray]:
    """Views refined together, one group per step in turn: interleaved (``i % G``), so a view's
    neighbours (usually the cameras next to it) are mostly refined in other steps and read fresh."""
    groups = max(1, math.ceil(num_views / max(1, views_per_batch)))
    return [np.arange(g, num_views, groups) for g in range(groups)]


@dataclass
class _Group:
    """The device tensors of one group of views (views stored contiguously, ``start:stop`` of the scene)."""

    start: int
    stop: int
    depth_init: torch.Tensor  # (B, 1, H, W), 0 where invalid
    valid: torch.Tensor  # (B, 1, H, W) bool
    valid_count: torch.Tensor  # () number of valid pixels
    confidence: torch.Tensor  # (B, 1, H, W)
    pix_index: torch.Tensor  # (B, Nmax) int32 flat indices of valid pixels
    pix_count: torch.Tensor  # (B, 1)
    K_src: torch.Tensor  # (B*k, 3, 3)
    K_dst: torch.Tensor  # (B*k, 3, 3)
    nbr: torch.Tensor  # (B*k,) storage indices of the neighbours
    dst_from_src: torch.Tensor  # (B*k, 4, 4)
    edge_w: tuple[torch.Tensor, torch.Tensor]
    surf_w: tuple[torch.Tensor, torch.Tensor]
    anchor_uv: torch.Tensor  # (B, P, 2)
    anchor_z: torch.Tensor  # (B, P)
    anchor_mask: torch.Tensor  # (B, P) bool
    mag_w: torch.Tensor  # (B, 1, H, W) per-pixel weights of L_mag (losses.magnitude_weights)
    grids: list[torch.Tensor]  # per level (B, 1, h_l, w_l), the parameters
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    adam_steps: torch.Tensor  # () device step count (skipped steps do not count)

    _FIXED = ("depth_init", "valid", "valid_count", "confidence", "pix_index", "pix_count", "K_src", "K_dst", "nbr",
              "dst_from_src", "anchor_uv", "anchor_z", "anchor_mask", "mag_w")

    def fixed_tensors(self) -> list[torch.Tensor]:
        """The tensors that do not change while optimizing, in a fixed order (see :meth:`from_tensors`)."""
        return [getattr(self, k) for k in self._FIXED] + [*self.edge_w, *self.surf_w]

    def state_tensors(self) -> list[torch.Tensor]:
        """The optimizer state: grids, Adam moments, step count."""
        return [*self.grids, *self.exp_avg, *self.exp_avg_sq, self.adam_steps]

    @classmethod
    def from_tensors(cls, start: int, stop: int, fixed: Sequence[torch.Tensor],
                     state: Sequence[torch.Tensor]) -> "_Group":
        n = len(cls._FIXED)
        levels = (len(state) - 1) // 3
        return cls(start=start, stop=stop, **dict(zip(cls._FIXED, fixed[:n])), edge_w=(fixed[n], fixed[n + 1]),
                   surf_w=(fixed[n + 2], fixed[n + 3]), grids=list(state[:levels]),
                   exp_avg=list(state[levels:2 * levels]), exp_avg_sq=list(state[2 * levels:3 * levels]),
                   adam_steps=state[-1])


# ---- scratch files: offloaded groups, maps awaiting the consistency gate ------------------

_ALIGN = 64


def _save_tensors(path: Path, tensors: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Write the tensors' raw bytes one after another (each padded to 64 bytes); returns their (shape, dtype) for
    :func:`_load_tensors`."""
    layout = []
    with open(path, "wb") as fh:
        for x in tensors:
            a = x.detach().contiguous().cpu().numpy()
            fh.write(a.reshape(-1).view(np.uint8).data)
            fh.write(b"\0" * (-a.nbytes % _ALIGN))
            layout.append((tuple(x.shape), x.dtype))
    return layout


def _load_tensors(path: Path, layout: Sequence[tuple[tuple[int, ...], torch.dtype]],
                  device: torch.device) -> list[torch.Tensor]:
    """Read back what :func:`_save_tensors` wrote: the same values, bit for bit (one read; on the CPU the tensors share
    its buffer)."""
    buf = np.fromfile(path, dtype=np.uint8)
    out, offset = [], 0
    for shape, dtype in layout:
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        nbytes = math.prod(shape) * np_dtype.itemsize
        out.append(torch.from_numpy(buf[offset: offset + nbytes].view(np_dtype).reshape(shape)).to(device))
        offset += nbytes + (-nbytes % _ALIGN)
    return out


@contextlib.contextmanager
def _scratch_folder(parent: Path | None) -> Iterator[Callable[[], Path]]:
    """Yield a function giving this call's own scratch folder (made on first use in ``parent``, or the
    system's temporary folder); the folder is removed on exit, also after an error."""
    made: list[Path] = []

    def folder() -> Path:
        if not made:
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            made.append(Path(tempfile.mkdtemp(prefix=".refine.", dir=parent)))
        return made[0]

    try:
        yield folder
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)


class _GroupStore:
    """Every group's tensors, made on first use and kept — or, when the groups exceed ``max_views``, the
    first groups kept and the others taking turns in one slot, their tensors in scratch files between
    turns (raw bytes: a group comes back bit-identical, so the result does not depend on ``max_views``)."""

    def __init__(self, spans: Sequence[tuple[int, int]], build: Callable[[int, int], _Group], max_views: int,
                 scratch: Callable[[], Path], device: torch.device):
        self.spans = list(spans)
        self._build, self._scratch, self._device = build, scratch, device
        sizes = [b - a for a, b in self.spans]
        kept = 0  # groups always resident; the remaining ones share one slot
        while kept < len(sizes) - 1 and sum(sizes[: kept + 1]) + max(sizes[kept + 1:]) <= max_views:
            kept += 1
        self.kept = kept
        self.offloading = kept < len(sizes) - 1
        self._resident: dict[int, _Group] = {}
        self._slot: tuple[int, _Group] | None = None
        self._layouts: dict[int, tuple[list, list]] = {}
        self.swaps = 0

    def get(self, g: int) -> _Group:
        if not self.offloading or g < self.kept:
            if g not in self._resident:
                self._resident[g] = self._build(*self.spans[g])
            return self._resident[g]
        if self._slot is not None and self._slot[0] == g:
            return self._slot[1]
        if self._slot is not None:
            self._save(*self._slot)
            self._slot = None
        self._slot = (g, self._load(g))
        return self._slot[1]

    def _paths(self, g: int) -> tuple[Path, Path]:
        folder = self._scratch()
        return folder / f"group{g:04d}.fixed", folder / f"group{g:04d}.state"

    def _save(self, g: int, gr: _Group) -> None:
        fixed, state = self._paths(g)
        if g not in self._layouts:  # the fixed tensors once, the state at every turn
            self._layouts[g] = (_save_tensors(fixed, gr.fixed_tensors()), [])
        self._layouts[g] = (self._layouts[g][0], _save_tensors(state, gr.state_tensors()))

    def _load(self, g: int) -> _Group:
        self.swaps += 1
        if g not in self._layouts:
            return self._build(*self.spans[g])
        fixed, state = self._paths(g)
        layout_fixed, layout_state = self._layouts[g]
        return _Group.from_tensors(*self.spans[g], _load_tensors(fixed, layout_fixed, self._device),
                                   _load_tensors(state, layout_state, self._device))

    def release(self) -> None:
        """Drop every group's tensors (the scratch files stay until the scratch folder goes)."""
        self._resident.clear()
        self._slot = None
