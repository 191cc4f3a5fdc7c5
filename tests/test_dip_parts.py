"""DIP degradations, seeds, PSNR and the ES-WMV stopping rule."""

import numpy as np
import pytest
import torch

from dipddpm.dip.degrade import box_mask, degrade
from dipddpm.dip.metrics import psnr
from dipddpm.dip.seeds import hash_normal, hash_uniform, sample_seed
from dipddpm.dip.stopping import EsWmv


def test_sample_seed_is_stable_across_processes():
    # a fixed number: Python's salted hash() would change it on every run
    assert sample_seed(0, "test-000001", "noise") == 1019908794
    assert sample_seed(1, "test-000001", "noise") != sample_seed(0, "test-000001", "noise")


def test_noise_is_seeded_by_key_not_by_position():
    clean = np.full((3, 1, 28, 28), 0.5, dtype=np.float32)
    keys = ["test-000000", "test-000001", "test-000002"]
    y, mask = degrade(clean, keys, "denoise", run_seed=0, sigma=25)
    y_rev, _ = degrade(clean[::-1], keys[::-1], "denoise", run_seed=0, sigma=25)
    y_one, _ = degrade(clean[1:2], keys[1:2], "denoise", run_seed=0, sigma=25)
    assert np.array_equal(y, y_rev[::-1]) and np.array_equal(y[1:2], y_one)
    assert not np.array_equal(y[0], y[1])
    assert not np.array_equal(y, degrade(clean, keys, "denoise", run_seed=1, sigma=25)[0])
    assert mask.min() == 1
    assert abs((y - 0.5).std() - 25 / 255) < 0.01  # no clipping around mid-grey
    y_hi, _ = degrade(np.ones_like(clean), keys, "denoise", run_seed=0, sigma=50)
    assert y_hi.max() <= 1.0 and y_hi.min() >= 0.0


def test_inpainting_masks():
    clean = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    y, mask = degrade(clean, ["a", "b"], "inpaint_box", run_seed=0, box=10)
    assert (mask == 0).sum() == 2 * 100 and mask[0, 0, 14, 14] == 0 and mask[0, 0, 0, 0] == 1
    assert np.array_equal(y, clean * mask)
    assert np.array_equal(box_mask((1, 28, 28), 10), mask[0])
    _, rm = degrade(clean, ["a", "b"], "inpaint_random", run_seed=0, keep_fraction=0.3)
    assert abs(rm.mean() - 0.3) < 0.05 and not np.array_equal(rm[0], rm[1])
    _, rm_a = degrade(clean[:1], ["a"], "inpaint_random", run_seed=0, keep_fraction=0.3)
    assert np.array_equal(rm_a[0], rm[0])
    with pytest.raises(ValueError, match="unknown task"):
        degrade(clean, ["a", "b"], "deblur", run_seed=0)


def test_hash_noise_is_per_seed_whatever_the_batch():
    both = hash_normal([5, 9], 3, (3, 4, 4))
    assert torch.equal(both[1:], hash_normal([9], 3, (3, 4, 4)))
    assert not torch.equal(both[0], hash_normal([5], 4, (3, 4, 4))[0])  # counter matters
    big = hash_normal(list(range(50)), 1, (1000,)).double()
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
    u = hash_uniform([1], 0, (10000,))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_psnr():
    ref = torch.zeros(2, 1, 4, 4)
    x = torch.full((2, 1, 4, 4), 0.1)
    x[1] = 1.5  # clipped to 1 first: MSE 1 -> 0 dB
    assert torch.allclose(psnr(x, ref), torch.tensor([20.0, 0.0]))
    mask = torch.zeros_like(ref)
    mask[..., :2, :] = 1
    x2 = x.clone()
    x2[..., 2:, :] = 0.7  # ignored under the mask
    assert torch.allclose(psnr(x2, ref, mask), torch.tensor([20.0, 0.0]))
    assert psnr(ref, ref)[0] == 100.0


def test_es_wmv_stops_after_the_variance_minimum():
    torch.manual_seed(0)
    window, patience, n = 10, 15, 120
    # amplitude of the wiggle falls to a minimum at t=40 (row 0) / t=70 (row 1), then rises
    es = EsWmv(2, window, patience)
    stops = [None, None]
    for t in range(1, n + 1):
        amp = torch.tensor([abs(t - 40) / 40 + 0.01, abs(t - 70) / 70 + 0.01])
        out = 0.5 + amp[:, None] * torch.randn(2, 16)
        new_min, stop = es.update(out, t)
        for b in range(2):
            if stop[b] and stops[b] is None:
                stops[b] = t
    best = es.best_iter.tolist()
    # the window's variance is lowest when the window straddles the minimum
    assert 38 <= best[0] <= 52 and 68 <= best[1] <= 82
    assert stops[0] == best[0] + patience and stops[1] == best[1] + patience
    es.select(torch.tensor([1]))
    assert es.best_iter.tolist() == [best[1]] and es.buffer.shape[1] == 1


def _alternating(steps):
    """Outputs whose window-2 variance at iteration t is exactly steps[t-1]^2 / 4: each output
    moves by +-steps[t-1] from the one before."""
    out, x = [], 0.0
    for t, d in enumerate(steps):
        x += d if t % 2 == 0 else -d
        out.append(torch.full((1, 4), x, dtype=torch.float64))
    return out


def test_es_wmv_is_frozen_at_its_first_stop():
    # a constructed variance curve: a minimum at 10, a rise, then a LOWER minimum at 40
    v = [1.0 - 0.08 * t for t in range(1, 11)] + [0.2 + 0.02 * t for t in range(1, 21)] \
        + [0.6 - 0.05 * t for t in range(1, 11)] + [0.2] * 20
    assert min(range(1, len(v) + 1), key=lambda t: v[t - 1]) == 40  # the global minimum
    es = EsWmv(1, window=2, patience=5)
    stopped_at, picks_after = None, []
    for t, out in enumerate(_alternating(v), start=1):
        new_min, stop = es.update(out, t)
        if stop[0] and stopped_at is None:
            stopped_at = t
        elif stopped_at is not None:
            picks_after.append(bool(new_min[0]))
            assert bool(stop[0])  # stopped stays stopped
    # first stop 5 iterations after the first minimum; the later, lower minimum changes nothing
    assert int(es.best_iter[0]) == 10 and stopped_at == 15 and int(es.stop_iter[0]) == 15
    assert not any(picks_after)
