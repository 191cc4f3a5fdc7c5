"""Fitting B DIP nets at once gives each net exactly what fitting it alone gives."""
import math

import pytest
import torch

from dipddpm.dip.fit import FitSettings, fit_batch, fit_single
from dipddpm.models.dip import SkipSpec

SPEC = SkipSpec(in_channels=3, out_channels=1, scales=2, channels_down=6, channels_up=5,
                channels_skip=2)
SEEDS = [11, 22, 33]


def _data(b=3, side=16):
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(b, 1, side, side, generator=g, dtype=torch.float64)
    noisy = (clean + 0.1 * torch.randn(b, 1, side, side, generator=g, dtype=torch.float64))
    return noisy.clamp(0, 1), clean


def _assert_same(batch, singles):
    for b, one in enumerate(singles):
        assert torch.equal(batch.stop_iter[b:b + 1], one.stop_iter)
        assert torch.equal(batch.es_iter[b:b + 1], one.es_iter)
        assert torch.equal(batch.backtracks[b:b + 1], one.backtracks)
        assert torch.allclose(batch.estimate[b:b + 1], one.estimate, atol=1e-10, rtol=0)
        for name in ("psnr_obs", "psnr_raw", "psnr_est"):
            x, y = getattr(batch, name)[:, b], getattr(one, name)[:, 0]
            assert torch.equal(x.isnan(), y.isnan()), name  # NaN after the same stop
            assert torch.allclose(torch.nan_to_num(x), torch.nan_to_num(y), atol=1e-9, rtol=0)


def test_batched_equals_one_at_a_time_with_early_stop_and_backtracking():
    y, clean = _data()
    # a tiny backtracking threshold makes restores frequent and different per net; a short
    # ES-WMV window makes the nets stop at different iterations and leave the stack
    s = FitSettings(iters=20, lr=0.05, backtrack_db=0.05, snapshot_every=3, stop="es_wmv",
                    es_window=3, es_patience=3)
    batch = fit_batch(y, None, clean, SEEDS, SPEC, s, dtype=torch.float64)
    singles = [fit_single(y[b:b + 1], None, clean[b:b + 1], SEEDS[b], SPEC, s,
                          dtype=torch.float64) for b in range(3)]
    _assert_same(batch, singles)
    assert (batch.backtracks > 0).any(), "the test must exercise a restore"
    assert len(set(batch.stop_iter.tolist())) > 1, "the nets must stop at different times"
    assert (batch.stop_iter < s.iters).all()
    # a stopped net's estimate is the raw output at its ES-WMV pick; its curve ends at its stop
    for b in range(3):
        last = int(torch.nonzero(~batch.psnr_obs[:, b].isnan()).max()) + 1
        assert last == batch.stop_iter[b] + s.es_patience
        est_psnr = -10 * torch.log10(((batch.estimate[b] - clean[b]) ** 2).mean())
        assert math.isclose(float(est_psnr), float(batch.psnr_raw[batch.stop_iter[b] - 1, b]),
                            abs_tol=1e-9)
        assert math.isclose(float(est_psnr), float(batch.es_psnr[b]), abs_tol=1e-9)


def test_budget_mode_runs_every_net_to_the_end_and_masks_inpainting():
    y, clean = _data()
    mask = torch.ones_like(y)
    mask[:, :, 4:10, 4:10] = 0
    s = FitSettings(iters=8, es_window=2, es_patience=2)
    batch = fit_batch(y * mask, mask, clean, SEEDS, SPEC, s, dtype=torch.float64)
    assert batch.stop_iter.tolist() == [8, 8, 8]
    assert not batch.psnr_est.isnan().any()
    one = fit_single(y[2:] * mask[2:], mask[2:], clean[2:], SEEDS[2], SPEC, s, dtype=torch.float64)
    _assert_same(fit_batch(y[2:] * mask[2:], mask[2:], clean[2:], SEEDS[2:], SPEC, s,
                           dtype=torch.float64), [one])
    assert torch.allclose(batch.psnr_est[:, 2], one.psnr_est[:, 0], atol=1e-9, rtol=0)


def test_a_net_is_the_same_in_any_batch():
    """The result of net b does not depend on who else is in its batch (float32 too)."""
    y, clean = _data()
    s = FitSettings(iters=5)
    all3 = fit_batch(y.float(), None, clean.float(), SEEDS, SPEC, s)
    last = fit_batch(y[2:].float(), None, clean[2:].float(), SEEDS[2:], SPEC, s)
    assert torch.allclose(all3.psnr_est[:, 2], last.psnr_est[:, 0], atol=1e-4)
    assert torch.allclose(all3.estimate[2], last.estimate[0], atol=1e-5)
    with pytest.raises(ValueError, match="seeds"):
        fit_batch(y, None, clean, SEEDS[:2], SPEC, s)


def test_a_budget_fit_runs_on_until_es_wmv_decides_and_keeps_the_budget_estimate():
    y, clean = _data()
    # budget 6 < pick + patience: the nets run on (at most 6 + 4) until ES-WMV decides
    s = FitSettings(iters=6, lr=0.05, es_window=2, es_patience=4, es_decide=True)
    batch = fit_batch(y, None, clean, SEEDS, SPEC, s, dtype=torch.float64)
    singles = [fit_single(y[b:b + 1], None, clean[b:b + 1], SEEDS[b], SPEC, s,
                          dtype=torch.float64) for b in range(3)]
    _assert_same(batch, singles)
    assert batch.psnr_est.shape[0] == s.max_iters == 10
    for b in range(3):
        run, pick, decided = (int(v[b]) for v in (batch.iters_run, batch.es_iter, batch.es_stop))
        assert run >= s.iters and int(batch.stop_iter[b]) == s.iters
        if decided:  # decided at pick + patience and stopped there (or at the budget)
            assert decided == pick + s.es_patience and run == max(s.iters, decided)
        else:
            assert run == s.max_iters
        # the reported estimate is the EMA at the budget, the ES outputs are those at the pick
        est = -10 * torch.log10(((batch.estimate[b] - clean[b]) ** 2).mean())
        assert math.isclose(float(est), float(batch.psnr_est[s.iters - 1, b]), abs_tol=1e-9)
        es = -10 * torch.log10(((batch.es_raw[b] - clean[b]) ** 2).mean())
        assert math.isclose(float(es), float(batch.es_psnr[b]), abs_tol=1e-9)
        # the oracle picks look inside the budget only
        best = int(batch.best_raw_iter[b])
        assert 1 <= best <= s.iters
        assert math.isclose(float(batch.psnr_raw[best - 1, b]),
                            float(batch.psnr_raw[:s.iters, b].max()), abs_tol=1e-12)
    assert (batch.iters_run > s.iters).any(), "the test must exercise a net running on"


def test_fit_settings_take_their_defaults_from_the_schema():
    """FitSettings' defaults are DIPConfig's (one place), and the repr of the defaults, part of
    every fit cache's fingerprint, is the one finished fits were stored under."""
    from dataclasses import fields

    from dipddpm.config import DIPConfig

    assert FitSettings() == FitSettings.from_config(DIPConfig())
    dip = {f.name for f in fields(DIPConfig)}
    assert [f.name for f in fields(FitSettings) if f.name not in dip] == ["es_decide"]
    assert repr(FitSettings()) == (
        "FitSettings(input_scale=0.1, reg_noise_std=0.03333333333333333, lr=0.01, iters=3000, "
        "exp_weight=0.99, backtrack_db=5.0, snapshot_every=10, stop='budget', es_window=100, "
        "es_patience=1000, es_decide=False, formulation='grouped', precision='fp32')")
