"""The refine stage's optimization loop: per-group losses, Adam on the pyramid grids, the refined maps.

Each step refines one group of views (:func:`_step`): the loss terms of
:func:`_group_losses` (:mod:`pipeline.refine.losses`; L_photo through
:func:`_photo_term`), gradients by autograd, an in-place Adam step
(:func:`_adam_step`) under a cosine learning-rate decay (:func:`_lr_at`);
a step whose loss or gradient is not finite is skipped on the device and
halves the learning rate. Steps go in rounds of ``parallel_groups`` groups
that read the same state of the other views (:func:`_optimize`), so a
multi-core CPU runs a round's steps side by side. The inner loop neither
copies between host and device nor synchronises (diagnostics go to a device
tensor read every ``log_every`` steps). :func:`_finalize` turns the groups' grids into
full-resolution refined maps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.core.geometry import inside_image, sample_image
from pipeline.core.io import DepthMap, View
from pipeline.core.workers import cpu_workers, map_in_threads
from pipeline.refine import losses
from pipeline.refine.config import RefineConfig
from pipeline.refine.gate import change_stats
from pipeline.refine.pyramid import _Group, _GroupStore, sample_views, upsample_sum, upsample_sum_pair
from pipeline.refine.scene import PhotoInputs, _decode_current

logger = logging.getLogger(__name__)

LOG_COLUMNS: tuple[str, ...] = ("loss", "L_mv", "L_anchor", "L_edge", "L_surf", "L_mag", "L_photo", "dz_mean", "dz_std",
                                "mv_kept", "photo_kept", "lr", "finite")
"""Per-step values in ``log.json`` (``dz_*`` in normalized-frame depth units, ``mv_kept`` / ``photo_kept`` = share of
the L_mv / L_photo samples used)."""


# ---- one step: losses of a group, Adam ---------------------------------------------------

LOSS_TERMS: tuple[str, ...] = ("L_mv", "L_anchor", "L_edge", "L_surf", "L_mag", "L_photo")


def _photo_term(gr: _Group, depth_at: Callable[[torch.Tensor], torch.Tensor], current: torch.Tensor,
                photo: PhotoInputs, channel: int, cfg: RefineConfig,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """L_photo of one group (:func:`pipeline.refine.losses.photometric_loss`): (loss, share of the sampled windows it
    used).

    ``photo_samples_per_view`` windows per view are centred on random valid
    pixels; their taps read the predicted depth (``depth_at(flat pixel indices
    (B, N)) -> (B, N)``), the view's own grey image (``channel`` 0: sharp, 1:
    blurred) and, through the neighbours, theirs.
    """
    B, _, H, W = gr.depth_init.shape
    dtype, device = gr.depth_init.dtype, gr.depth_init.device
    S = cfg.photo_samples_per_view
    images = photo.images
    offsets = photo.offsets.to(device)
    T = offsets.shape[0]
    pick = torch.minimum((torch.rand(B, S, generator=gen, device=device) * gr.pix_count).long(),
                         (gr.pix_count - 1).clamp(min=0).long())
    flat = torch.gather(gr.pix_index, 1, pick).long()  # (B, S)
    tx = (flat % W)[..., None] + offsets[:, 0].long()
    ty = torch.div(flat, W, rounding_mode="floor")[..., None] + offsets[:, 1].long()  # (B, S, T)
    in_image = (tx >= 0) & (tx < W) & (ty >= 0) & (ty < H)
    tap = (ty.clamp(0, H - 1) * W + tx.clamp(0, W - 1)).reshape(B, S * T)
    d_taps = depth_at(tap).reshape(B, S, T)
    tap_ok = torch.gather(gr.valid.reshape(B, -1), 1, tap).reshape(B, S, T) & in_image
    ref_taps = images[channel, gr.start:gr.stop].reshape(B, -1).gather(1, tap).reshape(B, S, T).to(dtype)
    uv = torch.stack([tx.to(dtype) + 0.5, ty.to(dtype) + 0.5], -1)
    gray = images[channel, ..., None]  # (V, H, W, 1), contiguous

    def read_image(uv_dst: torch.Tensor) -> torch.Tensor:
        return sample_views(gray, gr.nbr[:, None].expand(*uv_dst.shape[:2]), uv_dst)[:, 0].to(dtype)

    def read_depth(uv_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        read = sample_views(current, gr.nbr[:, None].expand(*uv_c.shape[:2]), uv_c, _decode_current)
        return read[:, 0], read[:, 1] > 0.999

    return losses.photometric_loss(ref_taps, d_taps, uv, tap_ok, gr.K_src, gr.K_dst, gr.dst_from_src, read_image,
                                   read_depth, offsets, height=H, width=W, sigma_color=cfg.photo_sigma_color,
                                   best_k=cfg.photo_best_k, behind_tol=cfg.photo_occlusion_tol,
                                   min_texture=cfg.photo_min_texture)


def weights_of(cfg: RefineConfig) -> dict[str, float]:
    """Loss term → its weight."""
    return {"L_mv": cfg.weight_mv, "L_anchor": cfg.weight_anchor, "L_edge": cfg.weight_edge,
            "L_surf": cfg.weight_surf, "L_mag": cfg.weight_mag, "L_photo": cfg.weight_photo}


def _group_losses(gr: _Group, current: torch.Tensor, cfg: RefineConfig, gen: torch.Generator,
                  photo: PhotoInputs | None = None,
                  image_channel: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss terms of one group at its current grids; returns (terms, depth_pred (B,1,H,W), share of L_mv samples kept,
    share of L_photo samples used). ``photo``: what L_photo reads (every view's grey images, the window's taps)."""
    B, _, H, W = gr.depth_init.shape
    d0 = gr.depth_init
    # L_photo's gradients are sparse (a few windows per view per step); Adam turns rare per-pixel gradients into
    # full-size steps, so they reach only the levels of stride >= photo_min_stride (the same depth, other paths).
    n_fine = sum(1 for s in cfg.pyramid_strides if s < cfg.photo_min_stride)
    log_corr, log_corr_photo = upsample_sum_pair(gr.grids, H, W, n_fine)
    pred = d0 * torch.exp(log_corr)  # 0 where invalid (d0 = 0 there)
    zero = gr.grids[-1].sum() * 0.0  # on the graph (from the smallest grid: no full-size pass, no full-size gradient)
    terms = dict.fromkeys(LOSS_TERMS, zero)
    kept = zero
    k = gr.nbr.shape[0] // B
    if k > 0 and cfg.weight_mv > 0:
        # L_mv: valid pixels → back-project at depth_pred → neighbours → their current depth there.
        S = cfg.samples_per_view
        # (a view without valid pixels samples pixel 0: invalid, so its confidence weight is 0)
        pick = torch.minimum((torch.rand(B, S, generator=gen, device=pred.device) * gr.pix_count).long(),
                             (gr.pix_count - 1).clamp(min=0).long())
        flat = torch.gather(gr.pix_index, 1, pick).long()  # (B, S)
        uv_src = torch.stack([(flat % W).to(pred.dtype) + 0.5,
                              torch.div(flat, W, rounding_mode="floor").to(pred.dtype) + 0.5], -1)
        d_src = torch.gather(pred.reshape(B, -1), 1, flat)
        c_src = torch.gather(gr.confidence.reshape(B, -1), 1, flat)
        uv_dst, z_sel = losses.reproject(uv_src.repeat_interleave(k, 0), d_src.repeat_interleave(k, 0), gr.K_src,
                                         gr.K_dst, gr.dst_from_src)
        # The neighbour's current depth is this step's target: read as a constant, at a constant location.
        # (B*k, 3, S): depth, valid, weight
        read = sample_views(current, gr.nbr[:, None].expand(B * k, S), uv_dst.detach(), _decode_current)
        inside = inside_image(uv_dst, H, W) & (read[:, 1] > 0.999)
        weight = c_src.repeat_interleave(k, 0) * read[:, 2]
        terms["L_mv"], keep = losses.multiview_loss(z_sel, read[:, 0], inside, delta=cfg.huber_delta,
                                                    tol=cfg.occlusion_tol, behind_tol=cfg.occlusion_tol_behind,
                                                    weight=weight)
        kept = keep.to(pred.dtype).mean()
    if cfg.weight_anchor > 0:
        terms["L_anchor"] = losses.anchor_loss(sample_image(pred, gr.anchor_uv)[:, 0], gr.anchor_z, gr.anchor_mask,
                                               delta=cfg.huber_delta)
    weights = weights_of(cfg)
    if weights["L_edge"] > 0 or weights["L_surf"] > 0 or weights["L_mag"] > 0:
        dense = losses.dense_terms(pred, gr.edge_w, gr.surf_w, d0, gr.mag_w)
        for name, value in zip(("L_edge", "L_surf", "L_mag"), dense):
            if weights[name] > 0:
                terms[name] = value
    photo_kept = zero
    if cfg.weight_photo > 0 and photo is not None and k > 0:
        if n_fine == 0:
            def depth_at(tap: torch.Tensor) -> torch.Tensor:
                return torch.gather(pred.reshape(B, -1), 1, tap)
        else:  # the depth of the sum without the finest levels, only at the taps (not over the whole map)
            def depth_at(tap: torch.Tensor) -> torch.Tensor:
                return (torch.gather(d0.reshape(B, -1), 1, tap)
                        * torch.exp(torch.gather(log_corr_photo.reshape(B, -1), 1, tap)))
        terms["L_photo"], photo_kept = _photo_term(gr, depth_at, current, photo, image_channel, cfg, gen)
    return terms, pred, kept, photo_kept


@torch.no_grad()
def _adam_step(gr: _Group, grads: Sequence[torch.Tensor], finite: torch.Tensor, lr: torch.Tensor,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = True) -> None:
    """In-place Adam on a group's grids; with ``finite`` False (a device flag, no sync) nothing changes.

    torch's fused Adam kernel (one pass over each grid instead of about ten
    full-size ops) where the device and torch version have it and ``fused``,
    else the same update in tensor ops; both give the same values up to rounding.
    """
    b1, b2 = betas
    f = finite.to(gr.adam_steps.dtype)
    gr.adam_steps += f
    if fused and _fused_adam(gr, grads, finite, lr, b1, b2, eps):
        return
    t = gr.adam_steps.clamp(min=1.0)
    step_size = lr * f / (1.0 - b1**t)
    bc2_sqrt = (1.0 - b2**t).sqrt()
    for p, m, v, g in zip(gr.grids, gr.exp_avg, gr.exp_avg_sq, grads):
        g = torch.where(finite, g, torch.zeros((), device=g.device))
        m.lerp_(g, (1.0 - b1) * f)
        v.lerp_(g * g, (1.0 - b2) * f)
        p.sub_(step_size * m / (v.sqrt() / bc2_sqrt + eps))


def _fused_adam(gr: _Group, grads: Sequence[torch.Tensor], finite: torch.Tensor, lr: torch.Tensor, b1: float,
                b2: float, eps: float) -> bool:
    """:func:`_adam_step` through ``torch._fused_adam_`` (the kernel of ``torch.optim.Adam(fused=True)``; its
    ``found_inf`` skips a non-finite step), the step count already advanced; False where it is unavailable."""
    kernel = getattr(torch, "_fused_adam_", None)
    if kernel is None:
        return False
    try:
        kernel(gr.grids, list(grads), gr.exp_avg, gr.exp_avg_sq, [], [gr.adam_steps] * len(gr.grids), lr=lr,
               beta1=b1, beta2=b2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False, grad_scale=None,
               found_inf=(~finite).to(torch.float32))
    except (RuntimeError, NotImplementedError, TypeError):  # no kernel for this device / torch version
        return False
    return True


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Device bool: every value of every tensor finite (no sync). torch's fused check of AMP's gradient scaler (one
    pass, no temporaries; it multiplies by 1.0 in place, which changes nothing) where available."""
    check = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
    if check is not None and tensors:
        found = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        try:
            check(list(tensors), found, torch.ones((), device=found.device))
            return found == 0
        except (RuntimeError, NotImplementedError, TypeError):  # no kernel for this device / dtype
            pass
    finite = torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    for t in tensors:
        finite = finite & torch.isfinite(t).all()
    return finite


def _lr_at(cfg: RefineConfig, step: int) -> float:
    """Cosine decay from ``lr`` to ``lr · lr_final_ratio`` over the run."""
    progress = step / max(cfg.steps - 1, 1)
    return cfg.lr * (cfg.lr_final_ratio + (1.0 - cfg.lr_final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---- the loop, the refined maps ----------------------------------------------------------

def round_size(cfg: RefineConfig, n_groups: int) -> int:
    """Steps per round (:func:`_optimize`): ``parallel_groups`` distinct groups, at most ``n_groups``; 1 with several
    steps per visit (consecutive steps of one group)."""
    if cfg.steps_per_visit != 1:
        return 1
    return max(1, min(cfg.parallel_groups, n_groups))


def _step(store: _GroupStore, step: int, current: torch.Tensor, cfg: RefineConfig, device: torch.device,
          photo: PhotoInputs | None, lr_scale: torch.Tensor,
          history: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """One optimizer step of the group whose turn ``step`` is: losses, gradients, Adam; writes ``history[step]``.

    Reads ``current`` (the other views' depth) and does not write it: returns
    (the group's first and end storage index, its prediction (B, H, W) before
    the update, finite flag) for :func:`_optimize` to publish. The step's
    random samples come from its own generator (seed, step), so a step draws
    the same pixels whichever thread runs it.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 1_000_003 + step)
    weights = weights_of(cfg)
    gr = store.get((step // cfg.steps_per_visit) % len(store.spans))
    grids = [g.detach().requires_grad_(True) for g in gr.grids]
    blurred = cfg.photo_blur > 0 and step < cfg.steps // 2
    terms, pred, kept, photo_kept = _group_losses(replace(gr, grids=grids), current, cfg, gen, photo,
                                                  1 if blurred else 0)
    loss = sum(weights[k] * terms[k] for k in LOSS_TERMS)
    grads = torch.autograd.grad(loss, grids, allow_unused=True)
    with torch.no_grad():
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, gr.grids)]
        finite = torch.isfinite(loss) & all_finite(grads)
        lr = _lr_at(cfg, step) * lr_scale
        _adam_step(gr, grads, finite, lr)
        dz = pred - gr.depth_init  # 0 where invalid: both are 0 there
        n = gr.valid_count.clamp(min=1.0)
        dz_mean = dz.sum() / n
        dz_flat = dz.reshape(-1)
        dz_std = (torch.dot(dz_flat, dz_flat) / n - dz_mean * dz_mean).clamp(min=0.0).sqrt()
        history[step] = torch.stack([loss, *(terms[k] for k in LOSS_TERMS), dz_mean, dz_std, kept, photo_kept, lr,
                                     finite.to(pred.dtype)])
    return gr.start, gr.stop, pred.detach()[:, 0], finite


def _optimize(store: _GroupStore, current: torch.Tensor, cfg: RefineConfig, device: torch.device, bar: Any,
              photo: PhotoInputs | None = None) -> np.ndarray:
    """The optimization loop (updates the groups' grids and ``current`` in place); returns the per-step log (steps,
    LOG_COLUMNS).

    Steps go in rounds of :func:`round_size` consecutive steps, each refining
    another group: every step of a round reads the other views' depth as it
    was when the round began, and the round's predictions are published to
    ``current`` together when it ends. So the steps of a round can run in
    parallel threads (``refine.cpu_workers`` on a CPU; one after the other on a
    GPU or when groups are offloaded to scratch files) and the result does not
    depend on how many do.
    """
    history = torch.zeros(max(cfg.steps, 1), len(LOG_COLUMNS), device=device)
    weights = weights_of(cfg)
    lr_scale = torch.ones((), device=device)
    skipped_seen = 0
    per_round = round_size(cfg, len(store.spans))
    workers = 1 if per_round == 1 or store.offloading else cpu_workers(cfg.cpu_workers, device)

    for first in range(0, cfg.steps, per_round):
        steps = list(range(first, min(first + per_round, cfg.steps)))
        if workers > 1:
            for step in steps:  # made here, one at a time (their inputs are read lazily)
                store.get((step // cfg.steps_per_visit) % len(store.spans))
        scale = lr_scale.clone()
        done = dict(map_in_threads(lambda s: _step(store, s, current, cfg, device, photo, scale, history), steps,
                                   workers))
        with torch.no_grad():
            for step in steps:  # neighbours read a group's depth as of its step (the prediction before the update)
                start, stop, pred, finite = done[step]
                cur = current[start:stop, ..., 0]
                cur.copy_(torch.where(finite, pred, cur))
                lr_scale = torch.where(finite, lr_scale, lr_scale * 0.5)
        del done, pred, finite, cur  # this round's tensors go before the next round's arrive
        for step in steps:
            if bar is not None:
                bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
                values = dict(zip(LOG_COLUMNS, history[step].tolist()))
                skipped_now = int((history[: step + 1, -1] == 0).sum().item())
                if skipped_now > skipped_seen:
                    logger.warning("refine: %d step(s) with a non-finite loss or gradient skipped so far; "
                                   "learning rate halved each time (now %.2e)", skipped_now, values["lr"])
                    skipped_seen = skipped_now
                if bar is not None:
                    shown = [k for k in LOSS_TERMS if weights[k] > 0]
                    bar.set_postfix({k: f"{values[k]:.2e}" for k in shown}
                                    | {"Δz_mean": f"{values['dz_mean']:.2e}", "Δz_std": f"{values['dz_std']:.2e}"},
                                    refresh=False)
    return history[: cfg.steps].cpu().numpy()


def _finalize(store: _GroupStore, views: Sequence[View], init: Sequence[DepthMap],
              emit: Callable[[int, DepthMap], None], keep_restored: bool = True) -> dict[str, dict[str, Any]]:
    """Full-resolution refined maps, one group at a time, handed to ``emit(storage index, map)``; never NaN.

    Without ``keep_restored`` (no gate to check them) the restored candidates are left out.

    Returns each view's statistics; the groups' tensors are released.
    """
    stats: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for g in range(len(store.spans)):
            gr = store.get(g)
            H, W = gr.depth_init.shape[-2:]
            pred = (gr.depth_init * torch.exp(upsample_sum(gr.grids, H, W))).cpu().numpy()
            d0 = gr.depth_init.cpu().numpy()
            valid_all = gr.valid.cpu().numpy()
            for j, i in enumerate(range(gr.start, gr.stop)):
                dm = init[i]
                h, w = dm.depth.shape
                valid = valid_all[j, 0, :h, :w]
                d_init = d0[j, 0, :h, :w]
                d_pred = pred[j, 0, :h, :w]
                bad = valid & ~(np.isfinite(d_pred) & (d_pred > 0))
                if bad.any():
                    logger.warning("refine: %s: %d non-finite refined depths replaced by the initial depth",
                                   views[i].name, int(bad.sum()))
                    d_pred = np.where(bad, d_init, d_pred)
                d_pred = np.where(valid, d_pred, 0.0).astype(np.float32)
                s = change_stats(d_init, d_pred, valid)
                stats[views[i].name] = s
                restored = dm.restored if dm.restored is not None else np.zeros_like(valid)
                if not keep_restored:
                    valid = valid & ~restored
                    d_pred = np.where(valid, d_pred, 0.0).astype(np.float32)
                emit(i, replace(dm, depth=d_pred, valid=valid.copy(),
                                confidence=np.where(valid, dm.confidence, 0.0).astype(np.float32),
                                depth_init=np.where(valid, d_init, 0.0).astype(np.float32), restored=restored & valid,
                                stats={**dm.stats, **s}))
            del gr, pred, d0, valid_all
    store.release()
    return stats
