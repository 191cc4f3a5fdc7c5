"""Every fast path against the plain path on the same inputs (the training loop's own runs are
in test_train.py): DIP formulations and precision, the sampling wrapper, the optimizer
implementations across a resume, the precision switch, and the fingerprints of finished work."""
import dataclasses
import hashlib
import json

import pytest
import torch

from dipddpm.config import config_from_dict, load_config
from dipddpm.dip.fit import FitSettings, fit_batch
from dipddpm.models.dip import FORMULATIONS, SkipNet, SkipSpec, grouped_forward, stack_params
from dipddpm.models.unet import build_unet
from dipddpm.precision import FastForward, native_bf16, resolve
from dipddpm.train.loop import make_optimizer, set_optimizer_impl

SMALL = SkipSpec(in_channels=3, out_channels=1, scales=3, channels_down=6, channels_up=5,
                 channels_skip=2)
SEEDS = [11, 22, 33]


def _nets(dtype=torch.float64, spec=SMALL):
    torch.manual_seed(0)
    nets = [SkipNet(spec).to(dtype) for _ in range(3)]
    x = torch.rand(3, spec.in_channels, 28, 28, dtype=dtype)
    target = torch.rand(3, 1, 28, 28, dtype=dtype)
    return nets, x, target


def _forward_and_grads(nets, x, target, **kw):
    stacked = {n: t.requires_grad_() for n, t in stack_params(nets).items()}
    out = grouped_forward(nets[0], stacked, x.reshape(1, -1, 28, 28), 3, **kw)
    out = out.reshape(3, 1, 28, 28)
    ((out.float() - target.float()) ** 2).mean((1, 2, 3)).sum().backward()
    return out.detach(), {n: t.grad for n, t in stacked.items()}


def test_every_formulation_computes_the_same_function(one_thread):
    nets, x, target = _nets()
    ref_out, ref_grads = _forward_and_grads(nets, x, target, formulation="grouped")
    for f in FORMULATIONS:
        out, grads = _forward_and_grads(nets, x, target, formulation=f)
        assert torch.allclose(out, ref_out, atol=1e-12, rtol=0), f
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], atol=1e-11, rtol=0), (f, name)
    with pytest.raises(ValueError, match="formulation"):
        _forward_and_grads(nets, x, target, formulation="winograd")


def test_emulated_bf16_is_native_bf16_at_fp32_speed(one_thread):
    """The emulation behind bench/dip_precision.py (bf16 storage, fp32 accumulation) lands far
    closer to real bf16 than fp32 does: outputs (within about one bf16 step of 0.004 at the
    sigmoid's output) and gradients. A small net: at 128 channels a CPU without native bf16
    falls back to kernels that also round partial sums, which native bf16 kernels do not."""
    from bench.dip_precision import round_bf16

    nets, x, target = _nets(torch.float32, SkipSpec(channels_down=16, channels_up=16))
    fp32, g32 = _forward_and_grads(nets, x, target)
    native, gn = _forward_and_grads(nets, x, target, dtype=torch.bfloat16)
    emulated, ge = _forward_and_grads(nets, x, target, round_fn=round_bf16)
    assert native.dtype == emulated.dtype == torch.float32  # the output comes back in fp32
    far = (fp32 - native).abs().mean()
    assert far > 0  # bf16 did round
    assert (emulated - native).abs().mean() < 0.5 * far
    assert (emulated - native).abs().max() < 0.004
    for name in ("body.down.0.weight", "body.up.1.weight", "head.weight"):
        far_g = (g32[name] - gn[name]).norm()
        assert (ge[name] - gn[name]).norm() < 0.25 * far_g, name


def _data(b=3, side=28):
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(b, 1, side, side, generator=g)
    return (clean + 0.1 * torch.randn(b, 1, side, side, generator=g)).clamp(0, 1), clean


def test_fit_formulations_and_precisions_against_the_plain_fit(one_thread):
    """fit_batch with each formulation gives the grouped fit's numbers; bf16 stays within a
    fraction of a dB of fp32 (and did run in bf16); auto is fp32 here unless bf16 is native."""
    y, clean = _data()
    s = FitSettings(iters=6, snapshot_every=2)
    plain = fit_batch(y, None, clean, SEEDS, SMALL, s)
    for f in ("bmm", "loop"):
        r = fit_batch(y, None, clean, SEEDS, SMALL, dataclasses.replace(s, formulation=f))
        assert torch.allclose(r.psnr_est, plain.psnr_est, atol=1e-3), f
        assert torch.allclose(r.estimate, plain.estimate, atol=1e-4), f
    bf16 = fit_batch(y, None, clean, SEEDS, SMALL, dataclasses.replace(s, precision="bf16"))
    assert not torch.equal(bf16.estimate, plain.estimate)
    assert bf16.estimate.dtype == torch.float32
    assert (bf16.psnr_est - plain.psnr_est).abs().max() < 0.5
    auto = fit_batch(y, None, clean, SEEDS, SMALL, dataclasses.replace(s, precision="auto"))
    same_as = bf16 if native_bf16("cpu") else plain
    assert torch.equal(auto.estimate, same_as.estimate)


def test_fast_forward_samples_like_the_plain_model(one_thread):
    torch.manual_seed(0)
    model = build_unet("unet-tiny").eval()
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.02)  # not the zero-initialised head
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        plain = model(x, t)
        cl = FastForward(model, "fp32", channels_last=True)(x, t)
        bf16 = FastForward(model, "bf16")(x, t)
    assert torch.allclose(cl, plain, atol=1e-5, rtol=1e-4)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, plain)
    assert torch.allclose(bf16, plain, atol=0.05 * plain.abs().max().item())
    assert FastForward(model, "auto").precision == resolve("auto", "cpu")


def test_optimizer_impl_survives_a_resume_from_another_impl():
    """load_state_dict brings back the flags it was saved with; set_optimizer_impl wins."""
    t = load_config(None, ["train.optimizer_impl=fused"]).train
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plain = make_optimizer(model, load_config(None).train)
    model(torch.ones(1, 3)).sum().backward()
    plain.step()
    fused = make_optimizer(model, t)
    assert fused.param_groups[0]["fused"] is True
    fused.load_state_dict(plain.state_dict())
    assert not fused.param_groups[0]["fused"]  # what a resume alone would leave
    set_optimizer_impl(fused, t.optimizer_impl)
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["foreach"] is None
    before = [p.detach().clone() for p in model.parameters()]
    fused.step()
    assert not torch.equal(before[0], model.weight)
    for impl, foreach, fused_flag in (("foreach", True, None), ("default", None, None)):
        opt = set_optimizer_impl(make_optimizer(model, t), impl)
        assert (opt.param_groups[0]["foreach"], opt.param_groups[0]["fused"]) == \
            (foreach, fused_flag)


def test_precision_switch():
    assert resolve("no", "cpu") == resolve("fp32", "cpu") == "fp32"
    assert resolve("bf16", "cpu") == "bf16"
    assert resolve("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    with pytest.raises(ValueError):
        resolve("fp8", "cpu")
    for key in ("train.mixed_precision=fp8", "dip.precision=half", "sample.precision=no",
                "dip.formulation=winograd"):
        with pytest.raises(Exception, match=key.split("=")[0]):
            load_config(None, [key])


def test_old_configs_and_fingerprints_are_unchanged():
    """A config.yaml written before these keys existed loads with today's behaviour, and the
    fingerprints of finished DIP work (fit_dip batches, priors) are those it had then."""
    from dipddpm.dip.priors import settings_of
    from dipddpm.dip.table import _NOT_IN_FINGERPRINT, _fingerprint

    new = {"train": ("channels_last", "optimizer_impl"), "sample": ("precision", "channels_last"),
           "dip": ("formulation", "precision")}
    tree = load_config(None).to_dict()
    for section, keys in new.items():
        for k in keys:
            del tree[section][k]
    old = config_from_dict(tree)
    assert old == load_config(None)
    assert (old.train.mixed_precision, old.train.channels_last, old.train.optimizer_impl) == \
        (None, False, "default")
    assert (old.dip.formulation, old.dip.precision) == ("grouped", "fp32")

    before = {k: v for k, v in tree["dip"].items() if k not in _NOT_IN_FINGERPRINT}
    text = json.dumps([before, old.run.seed, 25.0, ["k"]], sort_keys=True, default=str)
    assert _fingerprint(old, 25.0, ["k"]) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert _fingerprint(load_config(None, ["dip.formulation=bmm"]), 25.0, ["k"]) == \
        _fingerprint(old, 25.0, ["k"])  # the same function: finished batches still count
    bf16 = load_config(None, ["dip.precision=bf16"])
    assert _fingerprint(bf16, 25.0, ["k"]) != _fingerprint(old, 25.0, ["k"])
    assert "precision" not in settings_of(old, "d")["dip"]
    assert settings_of(bf16, "d")["dip"]["precision"] == "bf16"
