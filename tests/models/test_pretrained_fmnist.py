"""The Fashion-MNIST CBT shipped inside the package: loads offline through timm's pretrained path and reproduces the
test accuracy its cfg states (Debian's Fashion-MNIST test set)."""
import os

import pytest
import timm
import torch

from timm_cbsa.data import DEFAULT_FASHION_MNIST_DIR, FashionMNIST
from timm_cbsa.models.cbt_fmnist import FMNIST_WEIGHTS, WEIGHTS_DIR

import timm_cbsa

NAME = 'cbt_nano_patch8_32.fmnist'


def test_weights_file_is_inside_the_package_and_small():
    cfg = timm.create_model('cbt_nano_patch8_32').pretrained_cfg
    path = cfg['file']
    pkg = os.path.dirname(os.path.abspath(timm_cbsa.__file__))
    assert os.path.commonpath([os.path.abspath(path), pkg]) == pkg
    assert os.path.isfile(path), f'{path} missing: the weights must ship with the package'
    assert os.path.getsize(path) < 5e6
    assert FMNIST_WEIGHTS['test_top1'] is not None and str(FMNIST_WEIGHTS['test_top1']) in cfg['description']


def test_pretrained_loads_without_network(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')

    def no_download(*a, **k):
        raise AssertionError('pretrained load tried to download')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_download)
    m = timm.create_model(NAME, pretrained=True)
    fresh = timm.create_model('cbt_nano_patch8_32')
    from safetensors.torch import load_file
    sd = load_file(os.path.join(WEIGHTS_DIR, FMNIST_WEIGHTS['file']))
    assert set(sd) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not torch.equal(fresh.head.weight, m.head.weight)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason='Debian dataset-fashion-mnist not installed')
def test_pretrained_reproduces_stated_test_accuracy():
    """timm's eval transform for the pretrained cfg (as the trainer evaluates) on the 10k Debian test images."""
    from timm.data import create_transform, resolve_data_config
    m = timm.create_model(NAME, pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=m))
    ds = FashionMNIST(split='test', transform=tf)
    assert len(ds) == 10000
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds), 1000):
            items = [ds[j] for j in range(i, i + 1000)]
            x = torch.stack([t for t, _ in items])
            assert x.shape[1:] == (1, 32, 32)
            correct += int((m(x).argmax(-1) == torch.tensor([c for _, c in items])).sum())
    top1 = 100.0 * correct / len(ds)
    assert abs(top1 - float(FMNIST_WEIGHTS['test_top1'])) <= 0.2, (top1, FMNIST_WEIGHTS['test_top1'])
