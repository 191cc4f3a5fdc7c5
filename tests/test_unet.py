import pytest
import torch

from dipddpm.models.unet import UNET_CONFIGS, build_unet, count_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, params", [
    ("unet-tiny", 190_369),
    ("unet-small", 2_187_025),  # Annotated Diffusion's FashionMNIST net is ~2M
    ("unet-medium", 15_443_009),  # diffusers UNet2DModel(64,128,256) is 14.7M
])
def test_registry_parameter_counts(name, params):
    assert count_parameters(build_unet(name)) == params


def test_registry_sizes_are_what_the_docs_promise():
    assert 1.8e6 < count_parameters(build_unet("unet-small")) < 2.5e6
    assert 13e6 < count_parameters(build_unet("unet-medium")) < 17e6
    assert {"unet-small", "unet-medium"} <= set(UNET_CONFIGS)
    with pytest.raises(KeyError, match="unknown U-Net"):
        build_unet("unet-huge")


def test_shape_zero_init_and_time_conditioning():
    torch.manual_seed(0)
    net = build_unet("unet-tiny")
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([0, 10, 999])
    out = net(x, t)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised head: predicts eps = 0 at first
    torch.nn.init.normal_(net.head[-1].weight, std=0.1)
    same_x = x[:1].expand(3, -1, -1, -1)
    out = net(same_x, t)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = build_unet("unet-tiny")
    torch.nn.init.normal_(net.head[-1].weight, std=0.1)
    net(torch.randn(2, 1, 28, 28), torch.tensor([3, 7])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
