"""The optional Inception FID: torch-fidelity's FID Inception loaded from a local file, the FID
math on its features, the cached train reference, the one-line errors for a missing or bad
weights file, and the generation protocol with and without it.

The standard FID weights (pt_inception-2015-12-05-6726825d.pth) are not on this machine and are
never downloaded, so the weights file here is a real state dict of the same network from a
seeded random initialisation (torchvision's inception_v3 init with a 1008-class fc, which has
the FID Inception's tensor names and shapes; BatchNorm statistics then taken from one batch
through torch-fidelity's own forward, so the features neither vanish nor explode): a real
network in a real file, just not pretrained, and the code says so (`standard` is false).
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from dipddpm.config import ConfigError, UserError, load_config
from dipddpm.evaluate.fid import fid_from_features
from dipddpm.evaluate.inception import describe, floor_fid, load_inception, train_stats
from tests.conftest import make_tiny_world, skip_or_fail

KEY = "classifier.inception_weights"
TINY_DIP = ["dip.channels_down=8", "dip.channels_up=8", "dip.channels_skip=2", "dip.iters=3",
            "dip.batch_size=4", "dip.es_window=2", "dip.es_patience=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, 1 thread


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        skip_or_fail('torch-fidelity is not installed: pip install -c constraints.txt -e ".[test]"')
    from torchvision.models import inception_v3

    folder = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    init = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    path = folder / "inception_random.pth"
    torch.save(init.state_dict(), path)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(path))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    net.train()
    net(torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8))
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


def test_a_file_is_standard_only_by_its_hash(inc, tmp_path):
    assert len(inc.sha256) == 64 and not inc.standard  # random weights: never "standard"
    info = {"weights": str(inc.path), "sha256": inc.sha256, "ref_num": 8}
    assert "NOT the standard FID weights" in describe({**info, "standard": inc.standard})
    assert "on the standard FID weights" in describe({**info, "standard": True})
    assert "torchvision" in describe(info)  # results written before torch-fidelity


def test_torchvisions_imagenet_layout_is_refused_in_one_line(tmp_path):
    # torchvision's ImageNet checkpoint (AuxLogits, a 1000-class fc) is not the FID network
    from torchvision.models import inception_v3

    torch.manual_seed(1)
    path = tmp_path / "inception_v3_imagenet_layout.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, num_classes=1000,
                            init_weights=False).state_dict(), path)
    msg = one_line_error(lambda: load_inception(path))
    assert "does not load into the FID Inception" in msg and str(path) in msg


def one_line_error(fn):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and KEY in msg
    return msg


def test_bad_weights_files_are_one_line_errors(weights, tmp_path):
    missing = tmp_path / "nope.pth"
    msg = one_line_error(lambda: load_inception(missing))
    assert str(missing) in msg and "no such file" in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "never downloaded" in msg
    wrong = tmp_path / "classifier_state.pth"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 2)).state_dict(), wrong)
    msg = one_line_error(lambda: load_inception(wrong))
    assert str(wrong) in msg and "FID Inception" in msg
    state = torch.load(weights, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    assert "Mixed_7c.branch_pool.conv.weight" in one_line_error(lambda: load_inception(partial))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert str(garbage) in one_line_error(lambda: load_inception(garbage))
    with pytest.raises(ConfigError, match="classifier.inception_ref_num_images"):
        load_config(None, ["classifier.inception_ref_num_images=1"])


def test_generation_protocol_adds_inception_fid_only_when_set(world, weights, tmp_path):
    from dipddpm.evaluate import train_classifier
    from jobs.generate_eval import main

    base = [f"data.dir={world['data']}", f"classifier.dir={world['root'] / 'clf'}",
            "classifier.max_steps=2", "classifier.batch_size=8", "classifier.kid_num_subsets=2"]
    train_classifier(load_config(None, base), log=lambda *a: None)
    args = ["--config", "configs/generation.yaml", f"protocol.checkpoint={world['ddpm']}",
            "protocol.gen_num_images=4", "protocol.gen_ddpm=false", "protocol.gen_ddim_steps=[2]",
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
          "classifier.inception_ref_num_images=8", "classifier.inception_batch_size=4"])
    res = json.loads((tmp_path / "inc" / "results.json").read_text())
    assert [r["arm"] for r in res["arms"]] == ["ddpm", "ddim", "dip_estimate", "dip_start", "clean_start"]
    for r in res["arms"]:
        assert 0 < r["fid_inception"] < float("inf")
    assert 0 < res["floor"]["fid_inception"] < float("inf")
    assert res["inception"]["ref_num"] == 8 and res["inception"]["weights"] == str(weights)
    assert res["inception"]["standard"] is False
    # the classifier numbers are untouched by the option
    assert [r["fid"] for r in res["arms"]] == pytest.approx([r["fid"] for r in plain["arms"]])
    assert "NOT the standard FID weights" in (tmp_path / "inc" / "table.md").read_text()
    assert len(list((world["root"] / "clf").glob("inception-*-train-stats-n8.npz"))) == 1

    with pytest.raises(UserError, match=KEY):
        main([*args, f"run.dir={tmp_path / 'bad'}", f"{KEY}={tmp_path / 'missing.pth'}"])
