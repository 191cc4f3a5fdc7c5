"""The study's DIP skip net and its grouped (many nets at once) form."""
import pytest
import torch

from dipddpm.config import load_config
from dipddpm.models.dip import (SkipNet, SkipSpec, concat_cropped, grouped_forward, num_params,
                                stack_params, unstack_params)

SMALL = SkipSpec(in_channels=3, out_channels=1, scales=3, channels_down=6, channels_up=5,
                 channels_skip=2)


def test_default_is_the_studys_net():
    net = SkipNet()
    assert num_params(net) == 1_252_681
    out = net(torch.rand(2, 3, 28, 28))
    assert out.shape == (2, 1, 28, 28)
    assert 0 < out.min() and out.max() < 1  # sigmoid head


def test_spec_from_config_and_other_shapes():
    assert SkipSpec.from_config(load_config(None).dip) == SkipSpec()
    net = SkipNet(SkipSpec(in_channels=32, scales=4, channels_down=8, channels_up=8,
                           channels_skip=2))
    assert net(torch.rand(1, 32, 28, 28)).shape == (1, 1, 28, 28)  # 4 scales: 28..2, cropped
    # without skips nothing crops (as in the author's code): sides must halve evenly
    no_skip = SkipNet(SkipSpec(scales=2, channels_down=4, channels_up=4, channels_skip=0))
    assert no_skip(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="channels_down"):
        SkipNet(SkipSpec(scales=2, channels_down=(8, 8, 8)))


def test_concat_crops_to_the_centre():
    a = torch.arange(64.0).reshape(1, 1, 8, 8)
    b = torch.zeros(1, 2, 6, 6)
    out = concat_cropped([a, b])
    assert out.shape == (1, 3, 6, 6)
    assert torch.equal(out[0, 0], a[0, 0, 1:7, 1:7])


def test_grouped_forward_and_grads_equal_each_net_alone():
    torch.manual_seed(0)
    nets = [SkipNet(SMALL).double() for _ in range(3)]
    stacked = {n: t.requires_grad_() for n, t in stack_params(nets).items()}
    x = torch.rand(3, 3, 28, 28, dtype=torch.float64)
    target = torch.rand(3, 1, 28, 28, dtype=torch.float64)

    out = grouped_forward(nets[0], stacked, x.reshape(1, 9, 28, 28), 3).reshape(3, 1, 28, 28)
    ((out - target) ** 2).mean((1, 2, 3)).sum().backward()
    for b, net in enumerate(nets):
        alone = net(x[b:b + 1])
        assert torch.allclose(out[b:b + 1], alone, atol=1e-12, rtol=0)
        ((alone - target[b:b + 1]) ** 2).mean().backward()
        grads = unstack_params({n: t.grad for n, t in stacked.items()}, 3, b)
        for name, p in net.named_parameters():
            assert torch.allclose(grads[name], p.grad, atol=1e-12, rtol=0), name
