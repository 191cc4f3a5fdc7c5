"""The optional Inception FID: features, the FID math on them, the cached train reference, the
one-line errors for a bad weights file, and the generation protocol with and without it.

No pretrained weights exist here, so the weights file is a real inception_v3 state dict from a
seeded random initialisation (its BatchNorm statistics taken from one batch, so the features
are neither vanishing nor exploding): a real network in a real file, just not pretrained.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from dipddpm.config import ConfigError, UserError, load_config
from dipddpm.evaluate.fid import fid_from_features
from dipddpm.evaluate.inception import floor_fid, load_inception, train_stats
from tests.conftest import make_tiny_world

KEY = "classifier.inception_weights"
TINY_DIP = ["dip.channels_down=8", "dip.channels_up=8", "dip.channels_skip=2", "dip.iters=3",
            "dip.batch_size=4", "dip.es_window=2", "dip.es_patience=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, 1 thread


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 299, 299))
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inc(weights):
    return load_inception(weights, batch_size=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("inception_world"), n_test=8, T=20)


def images(n, seed, high=256):
    return np.random.default_rng(seed).integers(0, high, (n, 28, 28), dtype=np.uint8)


# every 2048-d FID is two 2048x2048 eigendecompositions (~4 s on one busy core): few of them
def test_features_and_fid(inc):
    a, b = images(4, 0), images(4, 1, high=80)  # b: darker images, another distribution
    fa = inc.features(a)
    assert fa.shape == (4, 2048) and fa.dtype == np.float32 and np.isfinite(fa).all()
    assert fa.std() > 0
    # [-1, 1] floats [N,1,28,28] (what the samplers give) are the same images as uint8, and in
    # eval mode an image's features do not depend on its batch neighbours or their order
    floats = torch.from_numpy(a).float().div(127.5).sub(1).unsqueeze(1).flip(0)
    fr = inc.features(floats)
    np.testing.assert_allclose(fr, fa[::-1], rtol=1e-4, atol=1e-3)
    other = fid_from_features(fa, inc.features(b))
    assert other > 1.0
    assert fid_from_features(fa, fa) <= 1e-6 * other


def test_reference_stats_are_cached_by_weights_and_reused(inc, world, tmp_path):
    cache = tmp_path / "clf"
    mu, sigma, n = train_stats(inc, world["data"], cache, 3)
    files = list(cache.glob("inception-*"))
    assert [f.name for f in files] == [f"inception-{inc.sha256[:16]}-train-stats-n3.npz"]
    assert n == 3 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    mtime = files[0].stat().st_mtime_ns
    mu2, sigma2, n2 = train_stats(inc, world["data"], cache, 3)
    assert files[0].stat().st_mtime_ns == mtime  # read back, not recomputed and rewritten
    assert n2 == 3 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    # the reference really is the first 3 train images
    from dipddpm.data import load_split

    train, _, _ = load_split(world["data"], "train")
    np.testing.assert_allclose(mu, inc.features(train[:3]).mean(0), rtol=1e-5, atol=1e-3)
    with pytest.raises(UserError, match="N = 9"):  # the test split holds 8 images
        floor_fid(inc, world["data"], cache, 9, 3)


def test_a_checkpoint_in_torchvisions_layout_loads(tmp_path):
    # torchvision's ImageNet file holds AuxLogits.* and a 1000-class fc: both are dropped, the
    # rest must load strictly (and keep its values)
    from torchvision.models import inception_v3

    torch.manual_seed(1)
    full = inception_v3(weights=None, aux_logits=True, num_classes=1000, init_weights=False)
    path = tmp_path / "inception_v3_layout.pth"
    torch.save(full.state_dict(), path)
    loaded = load_inception(path)
    assert loaded.model.AuxLogits is None and isinstance(loaded.model.fc, nn.Identity)
    assert loaded.model.transform_input  # as torchvision builds it for the Google weights
    assert torch.equal(loaded.model.Mixed_7c.branch_pool.conv.weight,
                       full.Mixed_7c.branch_pool.conv.weight)
    assert len(loaded.sha256) == 64


def one_line_error(fn):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and KEY in msg
    return msg


def test_bad_weights_files_are_one_line_errors(weights, tmp_path):
    missing = tmp_path / "nope.pth"
    assert str(missing) in one_line_error(lambda: load_inception(missing))
    wrong = tmp_path / "classifier_state.pth"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 2)).state_dict(), wrong)
    msg = one_line_error(lambda: load_inception(wrong))
    assert str(wrong) in msg and "inception_v3" in msg
    state = torch.load(weights, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    assert "Mixed_7c.branch_pool.conv.weight" in one_line_error(lambda: load_inception(partial))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert str(garbage) in one_line_error(lambda: load_inception(garbage))
    with pytest.raises(ConfigError, match="classifier.inception_ref_num"):
        load_config(None, ["classifier.inception_ref_num=1"])


def test_generation_protocol_adds_inception_fid_only_when_set(world, weights, tmp_path):
    from dipddpm.evaluate import train_classifier
    from jobs.generate_eval import main

    base = [f"data.dir={world['data']}", f"classifier.dir={world['root'] / 'clf'}",
            "classifier.max_steps=2", "classifier.batch_size=8", "classifier.kid_subsets=2"]
    train_classifier(load_config(None, base), log=lambda *a: None)
    args = ["--config", "configs/generation.yaml", f"protocol.checkpoint={world['ddpm']}",
            "protocol.gen_num=4", "protocol.gen_ddpm=false", "protocol.gen_ddim_steps=[2]",
            "protocol.gen_sigma_t0s=[0.5]", "protocol.gen_sources=[train]", "protocol.gen_steps=2",
            "protocol.batch_size=4",
            "wandb.mode=disabled", *TINY_DIP, *base]

    main([*args, f"run.dir={tmp_path / 'plain'}"])
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert "inception" not in plain and "fid_inception" not in plain["floor"]
    assert [r["arm"] for r in plain["arms"]] == ["ddpm", "ddim", "dip_estimate", "dip_start", "clean_start"]
    assert not any("fid_inception" in r for r in plain["arms"])
    assert "Inception" not in (tmp_path / "plain" / "table.md").read_text()

    main([*args, f"run.dir={tmp_path / 'inc'}", f"{KEY}={weights}",
          "classifier.inception_ref_num=8", "classifier.inception_batch_size=4"])
    res = json.loads((tmp_path / "inc" / "results.json").read_text())
    assert [r["arm"] for r in res["arms"]] == ["ddpm", "ddim", "dip_estimate", "dip_start", "clean_start"]
    for r in res["arms"]:
        assert 0 < r["fid_inception"] < float("inf")
    assert 0 < res["floor"]["fid_inception"] < float("inf")
    assert res["inception"]["ref_num"] == 8 and res["inception"]["weights"] == str(weights)
    # the classifier numbers are untouched by the option
    assert [r["fid"] for r in res["arms"]] == pytest.approx([r["fid"] for r in plain["arms"]])
    assert "Inception FID" in (tmp_path / "inc" / "table.md").read_text()
    assert len(list((world["root"] / "clf").glob("inception-*-train-stats-n8.npz"))) == 1

    with pytest.raises(UserError, match=KEY):
        main([*args, f"run.dir={tmp_path / 'bad'}", f"{KEY}={tmp_path / 'missing.pth'}"])
