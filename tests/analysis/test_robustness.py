"""Robustness to parameter noise: which parameters are perturbed, the noise itself, the clean point against an
independent evaluation, and the CLI end to end (segmentation and classification checkpoints)."""
import argparse
import csv
import os

import pytest
import timm
import torch

import timm_cbsa  # noqa: F401
from timm_cbsa.analysis import robustness as rb
from timm_cbsa.data import DEFAULT_FASHION_MNIST_DIR
from timm_cbsa.data.ade20k import ADE20KSegmentation, eval_transform
from timm_cbsa.segmentation import confusion_matrix, create_segmenter, segmentation_metrics

from seg_data import write_ade_folder


TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
DEC = {'cbsa': dict(embed_dim=12, num_heads=2, rep_grid=2, depth=2), 'mhsa': dict(num_heads=2, depth=2), 'linear': {}}


def _seg(decoder):
    return create_segmenter('vit_tiny_patch16_224', 150, decoder=decoder, decoder_kwargs=DEC[decoder], **TINY)


def test_attention_parameters_are_the_decoder_attention_layers():
    names = [n for n, _ in rb.attention_parameters(_seg('cbsa'))]
    assert names == [f'blocks.{i}.attn.{p}' for i in range(2) for p in ('step_rep', 'step_x', 'qkv.weight',
                                                                         'proj.weight', 'proj.bias')]
    names = [n for n, _ in rb.attention_parameters(_seg('mhsa'))]
    assert names == [f'blocks.{i}.attn.{p}' for i in range(2) for p in ('qkv.weight', 'qkv.bias', 'proj.weight',
                                                                         'proj.bias')]
    with pytest.raises(ValueError, match='no attention layers'):
        rb.attention_parameters(_seg('linear'))
    cbt = timm.create_model('cbt_nano_patch8_32', depth=2)
    assert {n.split('.attn.')[0] for n, _ in rb.attention_parameters(cbt)} == {'blocks.0', 'blocks.1'}


def test_noise_is_gaussian_seeded_and_confined():
    p = torch.zeros(200, 300)
    rb.perturb_([p], 0.05, seed=3)
    assert abs(p.std().item() - 0.05) < 0.002 and abs(p.mean().item()) < 0.002
    q = torch.zeros(200, 300)
    rb.perturb_([q], 0.05, seed=3)
    assert torch.equal(p, q)
    rb.perturb_([q], 0.05, seed=4)
    assert not torch.equal(p, q)
    model = _seg('mhsa')
    clean = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    (_, _, dec), (sigma, seed, noisy) = rb._noisy_copies(model.decoder, [0.1], [7])
    assert dec is model.decoder and (sigma, seed) == (0.1, 7)
    attn = {n for n, _ in rb.attention_parameters(noisy)}
    for k, v in noisy.state_dict().items():
        assert torch.equal(v, clean[k]) == (k not in attn), k      # exactly the attention parameters changed
    assert all(torch.equal(v, clean[k]) for k, v in model.decoder.state_dict().items())   # the original is clean


def test_clean_point_matches_an_independent_evaluation(tmp_path):
    write_ade_folder(tmp_path, n_train=1, n_val=3, size=(20, 28))
    torch.manual_seed(0)
    model = _seg('cbsa').eval()
    ds = ADE20KSegmentation(str(tmp_path), 'validation', eval_transform(32))
    rows = rb.segmentation_curve(model, ds, [1e3], [0], window=64, stride=64, device=torch.device('cpu'))
    conf = torch.zeros(150, 150, dtype=torch.int64)
    with torch.no_grad():
        for i in range(len(ds)):          # one window covers the 32 x 44 image: the model on the whole image
            img, label = ds[i]
            logits = torch.nn.functional.interpolate(model(img[None]), size=label.shape, mode='bilinear')
            conf += confusion_matrix(logits.argmax(1)[0], label, 150)
    assert rows[0]['sigma'] == 0 and rows[0]['value'] == pytest.approx(segmentation_metrics(conf)['mIoU'])
    assert rows[1]['sigma'] == 1e3 and rows[1]['value'] != rows[0]['value']


def _args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    rb.add_arguments(p)
    a = p.parse_args([])
    a.out, a.sigmas, a.seeds = str(tmp_path / 'out'), [0.01, 1.0], [0, 1]
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_cli_segmentation(tmp_path):
    from train import segment
    write_ade_folder(tmp_path, n_train=4, n_val=2, size=(20, 28))
    argv = ['--data-dir', str(tmp_path), '--crop-size', '32', '--model', 'vit_tiny_patch16_224', '--model-kwargs',
            'patch_size=8', 'embed_dim=16', 'depth=1', 'num_heads=2', '--batch-size', '2', '--epochs', '1',
            '--workers', '0', '--threads', '1']
    for dec in ('cbsa', 'mhsa'):
        kw = [f'{k}={v}' for k, v in DEC[dec].items()]
        segment.main(argv + ['--decoder', dec, '--decoder-kwargs', *kw, '--output', str(tmp_path / dec)])
    args = _args(tmp_path, checkpoint=[str(tmp_path / d / 'model_best.pth.tar') for d in ('cbsa', 'mhsa')],
                 labels=['CBSA', 'MHSA'], name='seg')
    summary = rb.run(args)
    assert {(r['model'], r['sigma']) for r in summary} == {(m, s) for m in ('CBSA', 'MHSA') for s in (0, 0.01, 1.0)}
    with open(tmp_path / 'out' / 'seg.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (1 + 2 * 2) and {r['metric'] for r in rows} == {'mIoU'}
    assert os.path.getsize(tmp_path / 'out' / 'seg.png') > 1000
    with pytest.raises(ValueError, match='labels'):
        rb.run(_args(tmp_path, checkpoint=args.checkpoint, labels=['one']))
    with pytest.raises(ValueError, match='not a train.segment'):
        torch.save({'x': 1}, tmp_path / 'bad.pth')
        rb.run(_args(tmp_path, checkpoint=[str(tmp_path / 'bad.pth')]))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason='Debian dataset-fashion-mnist not installed')
def test_cli_classification(tmp_path):
    """A train.train-style checkpoint of a softmax ViT and the shipped Fashion-MNIST CBT on 64 test images; the clean
    point is top-1 computed here with timm's eval transform."""
    torch.manual_seed(0)
    kwargs = dict(patch_size=8, embed_dim=16, depth=1, num_heads=2)
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, in_chans=1, img_size=32, **kwargs)
    torch.save(dict(state_dict=vit.state_dict(), args=dict(img_size=32, in_chans=None, interpolation=''),
                    model_config=dict(model='vit_tiny_patch16_224', model_kwargs=kwargs, num_classes=10, in_chans=1,
                                      img_size=32, convert=None)), tmp_path / 'vit.pth.tar')
    args = _args(tmp_path, checkpoint=[str(tmp_path / 'vit.pth.tar')], model=['cbt_nano_patch8_32.fmnist'],
                 labels=['ViT', 'CBT'], max_samples=64, seeds=[0], name='cls')
    summary = {(r['model'], r['sigma']): r['mean'] for r in rb.run(args)}
    cbt = timm.create_model('cbt_nano_patch8_32.fmnist', pretrained=True).eval()
    batches = rb._fmnist_batches(cbt, args, {})
    with torch.no_grad():
        acc = 100 * sum(int((cbt(x).argmax(-1) == y).sum()) for x, y in batches) / 64
    assert summary[('CBT', 0.0)] == pytest.approx(acc) and acc > 70
    assert summary[('CBT', 1.0)] < acc


def test_analysis_cli_entry(capsys):
    from timm_cbsa.analysis.__main__ import main
    assert main(['robustness']) == 2
    assert 'at least one --checkpoint or --model' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['no-such-subcommand'])
