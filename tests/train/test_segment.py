"""train.segment on the classification trainer's machinery (train.run, train.state): a 2-step smoke run, exact
mid-epoch resume, the ranked checkpoint history by mIoU, run-folder refusal, preemption checkpoint, a non-finite loss
stop, and the SLURM launcher's checks and job argv through --entry train.segment:main."""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from seg_data import write_ade_folder
from train import segment
from train.args import ConfigError
from train.checkpoint import CheckpointError, RunFolderError
from train.run import NonFiniteLossError

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
    with pytest.raises(RunFolderError, match='previous run'):
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


def test_checkpoint_history_is_ranked_by_miou(ade_dir, tmp_path):
    """3 epochs, 1 kept: the kept checkpoint-E and model_best are the epoch of the highest mIoU in summary.csv."""
    res = segment.main(_argv(ade_dir, tmp_path, '--epochs', '3', '--checkpoint-hist', '1', '--lr', '0.5'))
    with open(tmp_path / 'summary.csv') as f:
        miou = [float(r['eval_mIoU']) for r in csv.DictReader(f)]
    best = max(range(3), key=lambda e: (miou[e], -e))          # ties keep the earlier epoch
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*')) == [f'checkpoint-{best}.pth.tar']
    ckpt = torch.load(tmp_path / 'model_best.pth.tar', weights_only=True)
    assert ckpt['epoch'] == best and ckpt['metric'] == pytest.approx(miou[best])
    assert res['best_mIoU'] == pytest.approx(miou[best]) and res['best_epoch'] == best
    assert not list(tmp_path.glob('recovery-*'))


def test_a_non_finite_loss_stops_the_run(ade_dir, tmp_path):
    """A NaN loss at step 3: the check after it stops the run; the step-2 checkpoint is the last one, and named."""
    with pytest.raises(NonFiniteLossError, match=r'step 3.*last good checkpoint'):
        segment.main(_argv(ade_dir, tmp_path, '--debug-nan-at-step', '3', '--checkpoint-interval-steps', '2'))
    assert torch.load(tmp_path / 'last.pth.tar', weights_only=True)['global_step'] == 2
    assert segment.cli(_argv(ade_dir, tmp_path / 'b', '--debug-nan-at-step', '1')) == 2


def test_encoder_checkpoint_and_freeze(ade_dir, tmp_path):
    segment.main(_argv(ade_dir, tmp_path / 'enc', '--max-steps', '1', '--decoder', 'linear', '--decoder-kwargs'))
    ckpt = tmp_path / 'enc' / 'last.pth.tar'
    segment.main(_argv(ade_dir, tmp_path / 'dec', '--max-steps', '1', '--encoder-checkpoint', str(ckpt),
                       '--freeze-encoder'))
    enc = torch.load(ckpt, weights_only=True)['state_dict']
    dec = torch.load(tmp_path / 'dec' / 'last.pth.tar', weights_only=True)['state_dict']
    enc_keys = [k for k in enc if k.startswith('encoder.')]
    assert enc_keys and all(torch.equal(enc[k], dec[k]) for k in enc_keys)   # loaded, and frozen
    with pytest.raises(CheckpointError, match='incompatible with model .*the encoder'):
        segment.main(_argv(ade_dir, tmp_path / 'bad', '--encoder-checkpoint', str(ckpt), '--model-kwargs',
                           'patch_size=4', 'embed_dim=8', 'depth=1', 'num_heads=2'))


def test_bad_flags_are_refused(ade_dir, tmp_path):
    with pytest.raises(ConfigError, match='--epochs'):
        segment.validate_args(segment.parse_args(_argv(ade_dir, tmp_path, '--epochs', '0')))
    with pytest.raises(ConfigError, match='no such timm model'):
        segment.validate_args(segment.parse_args(_argv(ade_dir, tmp_path, '--model', 'vit_nope')))
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 3\nno_such_flag: 1\n')
    with pytest.raises(ConfigError, match="unknown option 'no_such_flag'"):
        segment.parse_args(['--config', str(cfg)])


def test_recipe_files_parse():
    for name in ('ade20k_vit_small_cbsa.yaml', 'garment_scenes_seg.yaml'):
        args = segment.parse_args(['--config', os.path.join(ROOT, 'train', 'configs', name)])
        segment.validate_args(args, check_paths=False)
    ade = segment.parse_args(['--config', os.path.join(ROOT, 'train', 'configs', 'ade20k_vit_small_cbsa.yaml')])
    assert (ade.epochs, ade.batch_size, ade.crop_size, ade.drop_path, ade.opt, ade.lr, ade.momentum,
            ade.weight_decay, ade.poly_power, ade.min_lr) == (64, 8, 512, 0.1, 'sgd', 1e-3, 0.9, 0.0, 0.9, 1e-5)


def test_slurm_launcher_checks_the_entry(ade_dir, tmp_path):
    """The launcher reads the flags with train.segment's own parser and checks (train.train's would refuse them)."""
    launch = pytest.importorskip('slurm.launch')
    from slurm.job import entry_flags, training_argv
    argv = ['--entry', 'train.segment:main', '--gpus-per-node', '0', '--', *_argv(ade_dir, tmp_path)]
    a, trainer = launch.prepare(argv)
    assert trainer.entry == 'train.segment:main' and entry_flags(trainer.entry) is segment
    with pytest.raises(launch.LaunchError, match='epochs'):
        launch.prepare(argv + ['--epochs', '0'])
    with pytest.raises(launch.LaunchError, match='no such folder'):
        launch.prepare([*argv[:-len(_argv(ade_dir, tmp_path))], *_argv(str(tmp_path / 'none'), tmp_path)])
    # in the job: the command line's --output is kept, else the job folder; --resume auto is added
    parsed = segment.parse_args(training_argv(_argv(ade_dir, tmp_path), '/ckpt/7', '7', segment))
    assert parsed.output == str(tmp_path) and parsed.resume == 'auto'
    parsed = segment.parse_args(training_argv(['--data-dir', ade_dir], '/ckpt/7', '7', segment))
    assert parsed.output == '/ckpt/7' and parsed.resume == 'auto'


@pytest.mark.slow
def test_preemption_signal_writes_a_checkpoint(ade_dir, tmp_path):
    """USR2 at step 1 (no handler before ours: the default action ends the process after the checkpoint)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-m', 'train.segment',
                           *_argv(ade_dir, tmp_path, '--debug-signal-at-step', '1', '--debug-signal',
                                  str(int(signal.SIGUSR2)))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGUSR2, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / 'last.pth.tar', weights_only=True)
    assert ckpt['global_step'] == 1 and ckpt['batches_done'] == 1
    res = segment.main(_argv(ade_dir, tmp_path, '--resume', 'auto'))
    assert res['step'] == 4


@pytest.mark.slow
def test_torchrun_two_cpu_processes_gloo(ade_dir, tmp_path):
    """2 ranks (gloo): 8 images / 2 ranks / batch 2 = 2 steps an epoch; the validation mIoU of the run (confusion
    matrices of the two ranks' halves summed) equals one process evaluating the saved model on the whole set."""
    from timm_cbsa.segmentation import segmenter_from_config
    from train.run import Collectives
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29547',
           '-m', 'train.segment', *_argv(ade_dir, tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count('*** Done') == 1
    ckpt = torch.load(tmp_path / 'last.pth.tar', weights_only=True)
    assert ckpt['world_size'] == 2 and ckpt['global_step'] == 2 and len(ckpt['rng_states']) == 2
    args = segment.parse_args(_argv(ade_dir, tmp_path))
    model = segmenter_from_config(ckpt['segmenter_config'])
    model.load_state_dict(ckpt['state_dict'])
    data = segment.build_data(args, model, rank=0, world=1)
    alone = segment.evaluate(model, data.val_share, args, torch.device('cpu'), Collectives(torch.device('cpu'), 1))
    assert json.loads((tmp_path / 'result.json').read_text())['mIoU'] == pytest.approx(alone['mIoU'], abs=1e-6)
