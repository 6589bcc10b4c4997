"""train.segment: a 2-step smoke run, exact mid-epoch resume, run-folder refusal, preemption checkpoint, and the
SLURM launcher's checks through --entry train.segment:main."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from seg_data import write_ade_folder
from train import segment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def ade_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade')
    write_ade_folder(root, n_train=8, n_val=2, size=(24, 32))
    return str(root)


def _argv(data, out, *extra):
    return ['--data-dir', data, '--output', str(out), '--num-classes', '150', '--crop-size', '16', '--base-size', '16',
            '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'patch_size=4', 'embed_dim=16', 'depth=1',
            'num_heads=2', '--decoder', 'cbsa', '--decoder-kwargs', 'embed_dim=12', 'num_heads=2', 'rep_grid=2',
            'depth=1', '--batch-size', '2', '--epochs', '1', '--workers', '0', '--drop-path', '0.1',
            '--log-interval', '1', '--threads', '1', *extra]


def test_smoke_two_steps(ade_dir, tmp_path):
    res = segment.main(_argv(ade_dir, tmp_path, '--max-steps', '2'))
    assert res['step'] == 2 and 0 <= res['mIoU'] <= 100 and 0 <= res['pixel_acc'] <= 100
    files = set(os.listdir(tmp_path))
    assert {'last.pth.tar', 'args.yaml', 'summary.csv', 'log.txt', 'result.json', '.lock'} <= files
    ckpt = torch.load(tmp_path / 'last.pth.tar', weights_only=True)
    assert ckpt['global_step'] == 2 and ckpt['batches_done'] == 2 and not ckpt['epoch_complete']
    assert ckpt['segmenter_config']['decoder'] == 'cbsa'
    assert json.loads((tmp_path / 'result.json').read_text())['step'] == 2
    # a fresh run into the same folder is refused; --resume auto continues it
    with pytest.raises(segment.SegmentConfigError, match='previous run'):
        segment.main(_argv(ade_dir, tmp_path))
    res = segment.main(_argv(ade_dir, tmp_path, '--resume', 'auto'))
    assert res['step'] == 4 and os.path.exists(tmp_path / 'model_best.pth.tar')


def test_mid_epoch_resume_is_exact(ade_dir, tmp_path):
    """2 steps, stop, resume to the end of the epoch == the epoch in one go (augmentation, order, drop-path RNG)."""
    segment.main(_argv(ade_dir, tmp_path / 'a'))
    segment.main(_argv(ade_dir, tmp_path / 'b', '--max-steps', '2'))
    segment.main(_argv(ade_dir, tmp_path / 'b', '--resume', 'auto'))
    a = torch.load(tmp_path / 'a' / 'last.pth.tar', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'last.pth.tar', weights_only=True)
    assert a['global_step'] == b['global_step'] == 4 and a['epoch_complete'] and b['epoch_complete']
    for k, v in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][k], v, rtol=0, atol=0, msg=k)
    assert a['metrics'] == b['metrics']


def test_encoder_checkpoint_and_freeze(ade_dir, tmp_path):
    segment.main(_argv(ade_dir, tmp_path / 'enc', '--max-steps', '1', '--decoder', 'linear', '--decoder-kwargs'))
    ckpt = tmp_path / 'enc' / 'last.pth.tar'
    segment.main(_argv(ade_dir, tmp_path / 'dec', '--max-steps', '1', '--encoder-checkpoint', str(ckpt),
                       '--freeze-encoder'))
    enc = torch.load(ckpt, weights_only=True)['state_dict']
    dec = torch.load(tmp_path / 'dec' / 'last.pth.tar', weights_only=True)['state_dict']
    enc_keys = [k for k in enc if k.startswith('encoder.')]
    assert enc_keys and all(torch.equal(enc[k], dec[k]) for k in enc_keys)   # loaded, and frozen
    with pytest.raises(segment.SegmentConfigError, match='does not fit'):
        segment.main(_argv(ade_dir, tmp_path / 'bad', '--encoder-checkpoint', str(ckpt), '--model-kwargs',
                           'patch_size=4', 'embed_dim=8', 'depth=1', 'num_heads=2'))


def test_bad_flags_are_refused(ade_dir, tmp_path):
    with pytest.raises(segment.SegmentConfigError, match='--epochs'):
        segment.validate_args(segment.parse_args(_argv(ade_dir, tmp_path, '--epochs', '0')))
    with pytest.raises(segment.SegmentConfigError, match='no such timm model'):
        segment.validate_args(segment.parse_args(_argv(ade_dir, tmp_path, '--model', 'vit_nope')))
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 3\nno_such_flag: 1\n')
    with pytest.raises(segment.SegmentConfigError, match='no_such_flag'):
        segment.parse_args(['--config', str(cfg)])


def test_recipe_files_parse():
    for name in ('ade20k_vit_small_cbsa.yaml', 'garment_scenes_seg.yaml'):
        args = segment.parse_args(['--config', os.path.join(ROOT, 'train', 'configs', name)])
        segment.validate_args(args, check_paths=False)
    ade = segment.parse_args(['--config', os.path.join(ROOT, 'train', 'configs', 'ade20k_vit_small_cbsa.yaml')])
    assert (ade.epochs, ade.batch_size, ade.crop_size, ade.drop_path, ade.opt, ade.lr, ade.momentum,
            ade.weight_decay, ade.poly_power, ade.min_lr) == (64, 8, 512, 0.1, 'sgd', 1e-3, 0.9, 0.0, 0.9, 1e-5)


def test_slurm_launcher_checks_the_entry(ade_dir, tmp_path):
    launch = pytest.importorskip('slurm.launch')
    launch.validate_train_argv('train.segment:main', _argv(ade_dir, tmp_path))
    with pytest.raises(launch.LaunchError, match='epochs'):
        launch.validate_train_argv('train.segment:main', _argv(ade_dir, tmp_path, '--epochs', '0'))


@pytest.mark.slow
def test_preemption_signal_writes_a_checkpoint(ade_dir, tmp_path):
    """USR2 at step 1 (no handler before ours: the default action ends the process after the checkpoint)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-m', 'train.segment', *_argv(ade_dir, tmp_path, '--debug-signal-at-step',
                                                                          '1')],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGUSR2, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / 'last.pth.tar', weights_only=True)
    assert ckpt['global_step'] == 1 and ckpt['batches_done'] == 1
    res = segment.main(_argv(ade_dir, tmp_path, '--resume', 'auto'))
    assert res['step'] == 4
