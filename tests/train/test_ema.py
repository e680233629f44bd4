import pytest
import torch

from zigzag_mamba.train.ema import EMA


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_update_moves_towards_the_weights_and_copies_buffers():
    net = _net()
    ema = EMA(net, decay=0.9)
    start = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].running_mean.fill_(5.0)
    ema.update(net)
    for before, after, now in zip(start, ema.module.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * now)
    assert torch.equal(ema.module[1].running_mean, torch.full((4,), 5.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_warmup_caps_the_decay_early():
    net = _net()
    ema = EMA(net, decay=0.999)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, step=0)  # decay 1/10
    for after, now in zip(ema.module.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(after, now - 0.1)


def test_state_dict_loads_into_the_model_and_bad_decay_is_rejected():
    net, other = _net(), torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    other.load_state_dict(EMA(net).module.state_dict())
    x = torch.randn(5, 3)
    torch.testing.assert_close(other.eval()(x), EMA(net)(x))
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.5)
