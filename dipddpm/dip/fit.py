"""Fitting the DIP to observations: one net at a time, or B independent nets at once.

One iteration, the DIP author's denoising loop: input z ~ U[0, input_scale) fixed per net plus
fresh N(0, reg_noise_std^2) jitter; forward; MSE to the observation (masked for inpainting);
output EMA (an average of outputs, not of weights); PSNR of the raw output to the observation,
and of the raw output and the estimate to the clean image when known; then either a step of
Adam or, when the PSNR to the observation fell more than `backtrack_db` below the last accepted
iteration's, a restore of the net's last snapshot (parameters and Adam state) instead.
Snapshots are taken at accepted iterations every `snapshot_every` iterations: a snapshot
copies parameters and both Adam moments, which on a CPU costs more than the Adam step itself.

Stopping. stop='budget' runs every net to `iters` and reports the output EMA there; ES-WMV
(`stopping.py`) is recorded on the way, and with `es_decide` a net runs on past `iters` until
ES-WMV has decided (at most `iters + es_patience`), so its pick and cost are the published
rule's. stop='es_wmv' stops each net at ES-WMV's decision and reports the raw output at its
pick. Per net the fit keeps the images a comparison needs: the budget estimate, the raw output
and the EMA at ES-WMV's pick, and, with a clean image, the raw output and the EMA at their best
iteration within the budget (the oracle, a bound).

`fit_single` is the plain reference: an nn.Module and torch.optim.Adam. `fit_batch` stacks the
B nets' parameters and runs them as grouped convolutions (each net's channels a group, see
`dipddpm.models.dip.grouped_forward`) with one fused Adam over per-net views, so each net's
numbers are those it would get alone: its randomness is a pure function of its seed (see
`seeds.py`), and a net that stops leaves the stack with its result fixed.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.optim.adam import adam as adam_functional

from dipddpm.config import DIPConfig
from dipddpm.dip.metrics import psnr
from dipddpm.dip.seeds import hash_normal, hash_uniform, sample_seed
from dipddpm.dip.stopping import EsWmv
from dipddpm.models.dip import SkipNet, SkipSpec, grouped_forward, stack_params
from dipddpm.precision import compute_dtype
from dipddpm.runs import atomic_path

BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, as in the DIP author's code
EPS = 1e-8


_DIP = DIPConfig()  # the schema's defaults: the one place the fitting defaults are written


@dataclass(frozen=True)
class FitSettings:
    """How each net is fitted: the fitting keys of the `dip` config section (their meaning and
    defaults are DIPConfig's) plus `es_decide`. Its repr is part of a fit cache's fingerprint
    (`batch_fingerprint`), so a field added here must leave the repr of older settings alone."""
    input_scale: float = _DIP.input_scale
    reg_noise_std: float = _DIP.reg_noise_std
    lr: float = _DIP.lr
    iters: int = _DIP.iters
    exp_weight: float = _DIP.exp_weight
    backtrack_db: float = _DIP.backtrack_db  # 0 turns backtracking off
    snapshot_every: int = _DIP.snapshot_every
    stop: str = _DIP.stop  # or "es_wmv": each net stops on its own ES-WMV signal
    es_window: int = _DIP.es_window
    es_patience: int = _DIP.es_patience
    # budget fits only: a net runs on past `iters` until ES-WMV has decided (at most
    # iters + es_patience iterations), so ES-WMV's pick and cost are the published rule's, not
    # cut at the budget; the budget estimate is still the one at `iters`
    es_decide: bool = False
    # fit_batch's network evaluation (dipddpm.models.dip): how the B nets' 3x3 convolutions
    # run, and the compute precision ("auto": bf16 where native, see dipddpm.precision)
    formulation: str = _DIP.formulation
    precision: str = _DIP.precision

    @classmethod
    def from_config(cls, dip, **overrides) -> "FitSettings":
        kw = {f.name: getattr(dip, f.name) for f in fields(cls) if hasattr(dip, f.name)}
        kw.update(overrides)
        return cls(**kw)

    @property
    def max_iters(self) -> int:
        """The most iterations any net runs."""
        extend = self.stop == "budget" and self.es_decide
        return self.iters + (self.es_patience if extend else 0)


@dataclass
class FitResult:
    """Everything per net (column b = net b); iterations counted from 1; NaN after a net stops.

    The curves have max_iters rows (iters, or iters + es_patience with es_decide). The oracle
    picks (`best_*`) look at the first `iters` iterations only and need the clean image (None
    without one)."""
    estimate: torch.Tensor  # [B, C, H, W] the reported estimate: the EMA output (raw if
    # exp_weight=0) at the budget; with stop='es_wmv' the raw output at ES-WMV's pick
    stop_iter: torch.Tensor  # [B] the iteration whose estimate is reported
    psnr_obs: torch.Tensor  # [T, B] raw output vs observation (masked)
    psnr_raw: torch.Tensor  # [T, B] raw output vs clean (NaN without a clean image)
    psnr_est: torch.Tensor  # [T, B] estimate (EMA) vs clean
    es_iter: torch.Tensor  # [B] iteration ES-WMV picked, final once it decided (0: window
    # never filled)
    es_psnr: torch.Tensor  # [B] raw output vs clean at es_iter
    backtracks: torch.Tensor  # [B] restores done
    es_stop: torch.Tensor = None  # [B] iteration at which ES-WMV decided (es_iter + patience;
    # 0: not decided by the net's last iteration)
    iters_run: torch.Tensor = None  # [B] iterations the net ran
    es_raw: torch.Tensor = None  # [B, C, H, W] raw output at es_iter (ES-WMV's output)
    es_ema: torch.Tensor = None  # [B, C, H, W] EMA at es_iter
    best_raw: Optional[torch.Tensor] = None  # [B, C, H, W] raw output at best_raw_iter
    best_raw_iter: Optional[torch.Tensor] = None  # [B] the raw output's best iteration
    best_ema: Optional[torch.Tensor] = None  # [B, C, H, W] EMA at best_ema_iter
    best_ema_iter: Optional[torch.Tensor] = None  # [B]
    seconds: float = 0.0  # wall time of the fit, on the machine that ran it


def make_net(spec: SkipSpec, seed: int) -> SkipNet:
    """A net initialised from its own seed, whatever the global RNG state is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SkipNet(spec)


def net_input(seeds, shape, s: FitSettings, dtype, device) -> torch.Tensor:
    return hash_uniform(seeds, 0, shape, dtype, device) * s.input_scale


def jittered(z: torch.Tensor, seeds, t: int, s: FitSettings) -> torch.Tensor:
    if s.reg_noise_std <= 0:
        return z
    return z + s.reg_noise_std * hash_normal(seeds, t + 1, z.shape[1:], z.dtype, z.device)


class _Monitor:
    """EMA, PSNR records, ES-WMV, the oracle picks and stop decisions of the nets still
    running (`active`: their indices into the batch). Per-net images live in full-batch
    tensors written at the active nets' rows, so a net that stops keeps what it had; what is
    kept only for the running nets (active, the output EMA, ES-WMV's window) is cut by
    `select(keep)`, as `_Nets.select` cuts the nets."""

    def __init__(self, y, mask, clean, s: FitSettings):
        b, dev = y.shape[0], y.device
        self.s, self.y, self.mask, self.clean = s, y, mask, clean
        self.length = s.max_iters
        nan = lambda: torch.full((self.length, b), math.nan, dtype=torch.float64,  # noqa
                                 device=dev)
        self.psnr_obs, self.psnr_raw, self.psnr_est = nan(), nan(), nan()
        self.active = torch.arange(b, device=dev)
        self.ema: Optional[torch.Tensor] = None
        self.es = EsWmv(b, s.es_window, s.es_patience, dev)
        self.estimate = torch.zeros_like(y)
        self.es_raw, self.es_ema = torch.zeros_like(y), torch.zeros_like(y)
        self.best_raw, self.best_ema = torch.zeros_like(y), torch.zeros_like(y)
        self.best_raw_iter = torch.zeros(b, dtype=torch.int64, device=dev)
        self.best_ema_iter = torch.zeros(b, dtype=torch.int64, device=dev)
        self.stop_iter = torch.zeros(b, dtype=torch.int64, device=dev)
        self.iters_run = torch.zeros(b, dtype=torch.int64, device=dev)
        self.es_iter = torch.zeros(b, dtype=torch.int64, device=dev)
        self.es_stop = torch.zeros(b, dtype=torch.int64, device=dev)
        self.es_psnr = torch.full((b,), math.nan, dtype=torch.float64, device=dev)

    def observe(self, t: int, out: torch.Tensor):
        """Record iteration t (0-based) of the active nets; return (psnr to y [A], stop [A])."""
        s, a = self.s, self.active
        w = s.exp_weight
        self.ema = out.clone() if self.ema is None else self.ema * w + out * (1 - w)
        obs = psnr(out, self.y[a], self.mask[a])
        self.psnr_obs[t, a] = obs.to(torch.float64)
        self.iters_run[a] = t + 1
        raw_psnr = None
        if self.clean is not None:
            raw_psnr = psnr(out, self.clean[a]).to(torch.float64)
            est_psnr = psnr(self.ema, self.clean[a]).to(torch.float64)
            self.psnr_raw[t, a] = raw_psnr
            self.psnr_est[t, a] = est_psnr
            if t < s.iters:  # the oracle looks inside the budget only
                self._keep_best(t, a, raw_psnr, out, self.psnr_raw, self.best_raw,
                                self.best_raw_iter)
                self._keep_best(t, a, est_psnr, self.ema, self.psnr_est, self.best_ema,
                                self.best_ema_iter)
        new_min, es_stopped = self.es.update(out, t + 1)
        if new_min.any():
            # ES-WMV picks an iteration by the variance of the raw outputs and returns the raw
            # output there; the EMA at the same iteration is kept for the EMA-vs-EMA comparison
            idx = a[new_min]
            self.es_raw[idx] = out[new_min]
            self.es_ema[idx] = self.ema[new_min]
            self.es_iter[idx] = t + 1
            if raw_psnr is not None:
                self.es_psnr[idx] = raw_psnr[new_min]
        self.es_stop[a] = self.es.stop_iter
        if t + 1 == s.iters and s.stop == "budget":
            self.estimate[a] = self.ema
            self.stop_iter[a] = t + 1
        if s.stop == "es_wmv":
            stop = es_stopped | (t + 1 >= s.iters)
        elif s.es_decide:
            stop = (es_stopped | (t + 1 >= self.length)) & (t + 1 >= s.iters)
        else:
            stop = torch.full_like(es_stopped, t + 1 >= s.iters)
        if s.stop == "es_wmv" and stop.any():
            idx = a[stop]
            use_es = self.es_iter[idx] > 0
            self.estimate[idx] = torch.where(use_es[:, None, None, None], self.es_raw[idx],
                                             self.ema[stop])
            self.stop_iter[idx] = torch.where(use_es, self.es_iter[idx], t + 1)
        return obs, stop

    @staticmethod
    def _keep_best(t, a, value, image, curve, best, best_iter):
        """Where iteration t beats the net's best so far, keep its image and iteration."""
        prev = torch.where(best_iter[a] > 0, curve[(best_iter[a] - 1).clamp_min(0), a],
                           torch.full_like(value, -math.inf))
        better = value > prev
        if better.any():
            idx = a[better]
            best[idx] = image[better]
            best_iter[idx] = t + 1

    def select(self, keep: torch.Tensor) -> None:
        self.active = self.active[keep]
        self.ema = self.ema[keep]
        self.es.select(keep)

    def result(self, backtracks: torch.Tensor, seconds: float) -> FitResult:
        cpu = lambda x: x.detach().cpu()  # noqa
        clean = self.clean is not None
        return FitResult(cpu(self.estimate), cpu(self.stop_iter), cpu(self.psnr_obs),
                         cpu(self.psnr_raw), cpu(self.psnr_est), cpu(self.es_iter),
                         cpu(self.es_psnr), cpu(backtracks), es_stop=cpu(self.es_stop),
                         iters_run=cpu(self.iters_run), es_raw=cpu(self.es_raw),
                         es_ema=cpu(self.es_ema),
                         best_raw=cpu(self.best_raw) if clean else None,
                         best_raw_iter=cpu(self.best_raw_iter) if clean else None,
                         best_ema=cpu(self.best_ema) if clean else None,
                         best_ema_iter=cpu(self.best_ema_iter) if clean else None,
                         seconds=seconds)


def _fused_available(device) -> bool:
    # fused Adam: one pass over params, grads and moments; ~10x faster than foreach on a CPU
    dev = torch.device(device)
    return dev.type in ("cuda", "cpu") and hasattr(torch, "_fused_adam_")


def _prepare(y, mask, clean, dtype, device):
    y = torch.as_tensor(y).to(device, dtype)
    mask = torch.ones_like(y) if mask is None else torch.as_tensor(mask).to(device, dtype)
    clean = None if clean is None else torch.as_tensor(clean).to(device, dtype)
    return y, mask, clean


# ----------------------------------------------------------------------------- one net


def fit_single(y, mask, clean, seed: int, spec: SkipSpec, s: FitSettings, *,
               dtype=torch.float32, device="cpu",
               on_iter: Optional[Callable[[int], None]] = None) -> FitResult:
    """Fit one net (seed) to one observation y [1, C, H, W]; the reference for fit_batch."""
    start = time.perf_counter()
    y, mask, clean = _prepare(y, mask, clean, dtype, device)
    net = make_net(spec, seed).to(device, dtype)
    z = net_input([seed], (spec.in_channels, *y.shape[2:]), s, dtype, device)
    opt = torch.optim.Adam(net.parameters(), lr=s.lr, betas=BETAS, eps=EPS,
                           fused=_fused_available(device))
    mon = _Monitor(y, mask, clean, s)
    backtracks = torch.zeros(1, dtype=torch.int64)
    ref, snap = None, None
    for t in range(mon.length):
        out = net(jittered(z, [seed], t, s))
        loss = ((out - y) ** 2 * mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        obs, stop = mon.observe(t, out.detach())
        obs = float(obs[0])
        if s.backtrack_db > 0 and ref is not None and obs < ref - s.backtrack_db:
            net.load_state_dict(snap[0])
            # load_state_dict keeps the given state tensors (no copy) and Adam then steps them
            # in place: hand it a copy, or the snapshot drifts with every later step
            opt.load_state_dict(copy.deepcopy(snap[1]))
            ref = snap[2]
            backtracks += 1
        else:
            ref = obs
            if t % s.snapshot_every == 0:
                snap = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), obs)
            opt.step()
        if on_iter is not None:
            on_iter(t)
        if bool(stop[0]):
            break
    return mon.result(backtracks, time.perf_counter() - start)


# ----------------------------------------------------------------------------- B nets at once


class _Nets:
    """The running nets of a batch (A of them) and everything fit_batch keeps per net besides
    the monitor's records: parameters, Adam moments and step counts (each tensor [A*rows, ...]),
    the last snapshot of all three, and per net its seed, its input z, `ref` (the PSNR to the
    observation of its last accepted iteration, which backtracking compares against; NaN
    before the first) and `snap_ref` (that PSNR at the snapshot). `select(keep)` cuts all of
    it to the nets that go on."""

    def __init__(self, params: dict[str, torch.Tensor], seeds: torch.Tensor, z: torch.Tensor):
        self.a = len(seeds)
        self.p = params
        self.m = {n: torch.zeros_like(t) for n, t in params.items()}
        self.v = {n: torch.zeros_like(t) for n, t in params.items()}
        self.steps = torch.zeros(self.a, dtype=torch.int64)  # per-net Adam step count
        self.snap: Optional[tuple] = None
        self.seeds, self.z = seeds, z
        self.ref = torch.full((self.a,), math.nan, dtype=torch.float64, device=z.device)
        self.snap_ref = self.ref.clone()

    def tensors(self):
        return (self.p, self.m, self.v)

    def per_net(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.a, -1)

    def inputs(self, t: int, s: FitSettings) -> torch.Tensor:
        """Iteration t's input of every net: its z plus that iteration's jitter."""
        return jittered(self.z, self.seeds, t, s)

    def backtrack(self, obs: torch.Tensor, db: float) -> torch.Tensor:
        """Restore the snapshot of every net whose PSNR to the observation (obs, float64) fell
        more than db below its reference (db 0: never), and accept the others' iteration (obs
        becomes their reference). Returns the nets restored (bool [A])."""
        if db > 0:
            bad = obs < self.ref - db  # False where ref is NaN
        else:
            bad = torch.zeros(self.a, dtype=torch.bool, device=obs.device)
        ref = self.ref
        if bad.any():
            with torch.no_grad():
                for d, sd in zip(self.tensors(), self.snap):
                    for n in d:
                        self.per_net(d[n])[bad] = self.per_net(sd[n])[bad]
            self.steps[bad.cpu()] = self.snap_steps[bad.cpu()]
            ref = torch.where(bad, self.snap_ref, ref)
        self.ref = torch.where(~bad, obs, ref)
        return bad

    def take_snapshot(self, good: torch.Tensor, obs: torch.Tensor) -> None:
        """Snapshot every net as it is now; the nets of this iteration (`good`) with obs as the
        snapshot's PSNR, the restored ones with the snapshot's they had."""
        if self.snap is None:
            self.snap = tuple({n: t.detach().clone() for n, t in d.items()} for d in self.tensors())
        else:
            for d, sd in zip(self.tensors(), self.snap):
                for n in d:
                    sd[n].copy_(d[n].detach())
        self.snap_steps = self.steps.clone()
        self.snap_ref = torch.where(good, obs, self.snap_ref)

    def select(self, keep: torch.Tensor):
        def sel(t):
            return self.per_net(t)[keep].reshape(-1, *t.shape[1:]).contiguous()
        n_keep = len(keep)
        self.p = {n: sel(t.detach()).requires_grad_(True) for n, t in self.p.items()}
        self.m = {n: sel(t) for n, t in self.m.items()}
        self.v = {n: sel(t) for n, t in self.v.items()}
        if self.snap is not None:
            self.snap = tuple({n: sel(t) for n, t in d.items()} for d in self.snap)
            self.snap_steps = self.snap_steps[keep.cpu()]
        self.steps = self.steps[keep.cpu()]
        self.seeds, self.z = self.seeds[keep], self.z[keep]
        self.ref, self.snap_ref = self.ref[keep], self.snap_ref[keep]
        self.a = n_keep

    def adam_step(self, grads: dict[str, torch.Tensor], good: torch.Tensor, lr: float):
        """One Adam step for the nets in `good`; the others do not change."""
        names = list(self.p)
        good_cpu = good.cpu()
        idx = torch.nonzero(good_cpu).flatten().tolist()
        if not idx:
            return
        steps = self.steps
        same = len(idx) == self.a and bool((steps == steps[0]).all())
        if same:
            ps = [self.p[n].detach() for n in names]
            gs = [grads[n] for n in names]
            ms = [self.m[n] for n in names]
            vs = [self.v[n] for n in names]
            st = [torch.tensor(float(steps[0])) for _ in names]
        else:
            ps, gs, ms, vs, st = [], [], [], [], []
            rows = {n: (self.per_net(self.p[n].detach()), self.per_net(grads[n]),
                        self.per_net(self.m[n]), self.per_net(self.v[n])) for n in names}
            for b in idx:
                for n in names:
                    p, g, m, v = rows[n]
                    ps.append(p[b]), gs.append(g[b]), ms.append(m[b]), vs.append(v[b])
                    st.append(torch.tensor(float(steps[b])))
        if ps[0].device.type == "cuda":
            st = [x.to(ps[0].device) for x in st]
        with torch.no_grad():
            adam_functional(ps, gs, ms, vs, [], st, fused=_fused_available(ps[0].device),
                            amsgrad=False, beta1=BETAS[0], beta2=BETAS[1], lr=lr,
                            weight_decay=0.0, eps=EPS, maximize=False)
        self.steps[good_cpu] += 1


def fit_batch(y, mask, clean, seeds: Sequence[int], spec: SkipSpec, s: FitSettings, *,
              dtype=torch.float32, device="cpu",
              on_iter: Optional[Callable[[int], None]] = None) -> FitResult:
    """Fit len(seeds) independent nets to observations y [B, C, H, W] (mask, clean alike)."""
    start = time.perf_counter()
    y, mask, clean = _prepare(y, mask, clean, dtype, device)
    b = len(seeds)
    if y.shape[0] != b:
        raise ValueError(f"{len(seeds)} seeds for {y.shape[0]} observations")
    template = make_net(spec, seeds[0])  # structure only; its own parameters are not used
    params = stack_params([make_net(spec, sd) for sd in seeds])
    h, w = y.shape[2:]
    cin, cout = spec.in_channels, spec.out_channels
    seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=device)
    nets = _Nets({n: t.to(device, dtype).requires_grad_(True) for n, t in params.items()},
                 seed_t, net_input(seed_t, (cin, h, w), s, dtype, device))
    del params
    mon = _Monitor(y, mask, clean, s)
    backtracks = torch.zeros(b, dtype=torch.int64, device=device)
    low = compute_dtype(s.precision, device)  # None: the nets compute in `dtype`
    low = None if low == torch.float32 else low
    for t in range(mon.length):
        a_idx = mon.active
        na = nets.a
        x = nets.inputs(t, s).reshape(1, na * cin, h, w)
        out = grouped_forward(template, nets.p, x, na, s.formulation,
                              low).reshape(na, cout, h, w)
        loss = (((out - y[a_idx]) ** 2) * mask[a_idx]).mean((1, 2, 3)).sum()
        names = list(nets.p)
        grads = dict(zip(names, torch.autograd.grad(loss, [nets.p[n] for n in names])))
        obs, stop = mon.observe(t, out.detach())
        obs = obs.to(torch.float64)
        bad = nets.backtrack(obs, s.backtrack_db)
        backtracks[a_idx[bad]] += 1
        good = ~bad
        if t % s.snapshot_every == 0:
            nets.take_snapshot(good, obs)
        nets.adam_step(grads, good, s.lr)
        del grads
        if on_iter is not None:
            on_iter(t)
        if stop.any():
            keep = torch.nonzero(~stop).flatten()
            if len(keep) == 0:
                break
            for running in (mon, nets):  # every per-net state of the running nets, cut together
                running.select(keep)
    return mon.result(backtracks, time.perf_counter() - start)


NET_SEED = "dip-net"  # the purpose each image's net is seeded with (see seeds.sample_seed)


CACHE_VERSION = 1  # raise when a change to the fit changes its results


def batch_fingerprint(spec: SkipSpec, s: FitSettings, device, seeds, y, mask, clean) -> str:
    """What a batch's fit depends on: the net, the settings, the compute dtype and device type,
    the nets' seeds and the observations, masks and clean images (bytes)."""
    h = hashlib.sha256(repr((CACHE_VERSION, spec, s, str(compute_dtype(s.precision, device)),
                             torch.device(device).type, list(seeds))).encode())
    for t in (y, mask, clean):
        h.update(b"none" if t is None else
                 np.ascontiguousarray(torch.as_tensor(t).float().cpu().numpy()).tobytes())
    return h.hexdigest()[:32]


def _load_cached(path: Path) -> Optional[FitResult]:
    try:
        return FitResult(**torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # unreadable or from an older layout: fit again and overwrite it
        return None


def fit_by_key(y, mask, clean, keys: Sequence[str], spec: SkipSpec, s: FitSettings, *,
               run_seed: int, batch_size: int, device="cpu",
               on_iter: Optional[Callable[[int, int], None]] = None,
               cache: Optional[str | Path] = None):
    """Fit one net per sample, `batch_size` nets at a time; yields (slice, FitResult).

    Each net is seeded from (run_seed, its sample key), so an image's result does not depend on
    the batching: the priors job, fit_dip and the protocols get the same fit for the same key.
    on_iter(t, nets in the batch) is called after every iteration. With `cache` (a folder),
    each batch's result is stored as `<fingerprint>.pt` and a batch with the same fingerprint
    (`batch_fingerprint`) is read back instead of fitted, its `seconds` those of the original
    fit: a killed job resumes after its last finished batch, and jobs that fit the same images
    with the same settings (the restoration protocol at two checkpoints) fit them once."""
    for lo in range(0, len(keys), batch_size):
        hi = min(lo + batch_size, len(keys))
        seeds = [sample_seed(run_seed, k, NET_SEED) for k in keys[lo:hi]]
        parts = [None if t is None else t[lo:hi] for t in (y, mask, clean)]
        path, r = None, None
        if cache is not None:
            path = Path(cache) / f"{batch_fingerprint(spec, s, device, seeds, *parts)}.pt"
            r = _load_cached(path) if path.exists() else None
        if r is None:
            cb = None if on_iter is None else (lambda t, n=hi - lo: on_iter(t, n))
            r = fit_batch(*parts, seeds, spec, s, device=device, on_iter=cb)
            if path is not None:
                with atomic_path(path) as tmp:
                    torch.save({f.name: getattr(r, f.name) for f in fields(r)}, tmp)
        elif on_iter is not None:
            for t in range(int(r.iters_run.max())):
                on_iter(t, hi - lo)
        yield slice(lo, hi), r
