#!/usr/bin/env python3
"""The offline segmentation check (docs/segmentation.md): the CBSA decoder vs Segmenter's MHSA mask transformer and
linear decoder on composed garment scenes, same encoder, same budget; then their robustness to noise on the
decoder's attention parameters. A composed proxy, not ADE20K.

    nice python benchmarks/seg_garments.py --stage joint           # scenes + 3 trainings (CPU)
    nice python benchmarks/seg_garments.py --stage frozen          # 3 trainings on the frozen encoder + robustness
    # the same with the trainings of a stage in parallel:
    for d in cbsa mhsa linear; do nice python benchmarks/seg_garments.py --stage S --decoders $d --skip-robustness & done
    wait; nice python benchmarks/seg_garments.py --stage S --skip-training
    python benchmarks/seg_garments.py --train 64 --val 8 --epochs 1 --data /tmp/sg/data --work /tmp/sg --out /tmp/sg \
        --images /tmp/sg --seeds 0 --max-samples 4      # smoke, 10 s

Stages (``train/configs/garment_scenes_seg.yaml``, the same seed and number of steps for every decoder):

* ``joint``: every decoder fine-tuned jointly with the encoder, from the same pretrained weights (the shipped
  Fashion-MNIST CBT, ``cbt_nano_patch8_32.fmnist``);
* ``frozen``: the encoder of the joint *linear* run (model_best) frozen, every decoder trained from scratch on it
  (``--encoder-checkpoint ... --freeze-encoder``): one encoder for all three.

1. writes the scenes (``timm_cbsa.data.garment_scenes``) unless --data holds them;
2. trains each decoder with ``python -m train.segment``, in-process;
3. counts decoder FLOPs and writes RESULTS/seg_garments_STAGE.{csv,md};
4. runs ``python -m timm_cbsa.analysis robustness`` on the stage's CBSA and MHSA runs (model_best) and writes
   RESULTS/robustness_garments_STAGE{,_summary}.csv and IMAGES/robustness_garments_STAGE.png.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

CONFIG = os.path.join(ROOT, 'train', 'configs', 'garment_scenes_seg.yaml')
# decoder -> (--decoder-kwargs, label); the CBSA options come from the recipe file
DECODERS = {'cbsa': (None, 'CBSA mask transformer'), 'mhsa': ([], 'Segmenter MHSA mask transformer'),
            'linear': ([], 'Segmenter linear')}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--stage', default='joint', choices=('joint', 'frozen'))
    p.add_argument('--data', default=os.path.join(ROOT, 'output', 'garment_scenes'))
    p.add_argument('--train', type=int, default=3000, help='training scenes (when they are written)')
    p.add_argument('--val', type=int, default=200, help='validation scenes')
    p.add_argument('--epochs', type=int, default=None, help='override the recipe')
    p.add_argument('--max-steps', type=int, default=None)
    p.add_argument('--decoders', nargs='+', default=list(DECODERS), choices=list(DECODERS))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='noise seeds of the robustness step')
    p.add_argument('--max-samples', type=int, default=None,
                   help='validation scenes of the robustness step (default: all)')
    p.add_argument('--work', default=os.path.join(ROOT, 'output', 'seg_garments'), help='run folders')
    p.add_argument('--out', default=os.path.join(HERE, 'results'), help='CSV / markdown folder')
    p.add_argument('--images', default=os.path.join(ROOT, 'docs', 'images', 'segmentation'))
    p.add_argument('--skip-training', action='store_true', help='reuse the run folders in --work')
    p.add_argument('--skip-robustness', action='store_true', help='train only (e.g. one decoder per process)')
    p.add_argument('--figure', action='store_true', help='also draw validation scenes, labels and predictions')
    return p


def train_all(a) -> list:
    from train import segment
    rows = []
    for dec in a.decoders:
        extra = ['--decoder', dec] + ([] if DECODERS[dec][0] is None else ['--decoder-kwargs', *DECODERS[dec][0]])
        extra += ['--epochs', str(a.epochs)] if a.epochs else []
        extra += ['--max-steps', str(a.max_steps)] if a.max_steps else []
        if a.stage == 'frozen':
            extra += ['--encoder-checkpoint', os.path.join(a.work, 'linear', 'model_best.pth.tar'), '--freeze-encoder']
        run_dir = os.path.join(a.work, dec if a.stage == 'joint' else f'frozen_{dec}')
        if not a.skip_training:
            t0 = time.time()
            segment.main(['--config', CONFIG, '--data-dir', a.data, '--output', run_dir, '--overwrite', *extra])
            print(f'[seg_garments] {dec}: {time.time() - t0:.0f} s', flush=True)
        rows.append(dict(stage=a.stage, **_row(dec, run_dir)))
    return rows


def _row(dec: str, run_dir: str) -> dict:
    import torch
    from timm_cbsa.segmentation import decoder_flops, segmenter_from_config
    res = json.load(open(os.path.join(run_dir, 'result.json')))
    ckpt = torch.load(os.path.join(run_dir, 'last.pth.tar'), map_location='cpu', weights_only=True)
    with torch.device('meta'):
        model = segmenter_from_config(ckpt['segmenter_config'])
    crop = ckpt['args']['crop_size']
    f = decoder_flops(model, crop)
    return dict(decoder=DECODERS[dec][1], mIoU=round(res['mIoU'], 2), best_mIoU=round(res['best_mIoU'] or 0, 2),
                pixel_acc=round(res['pixel_acc'], 2), mAcc=round(res['mAcc'], 2),
                decoder_mflops_blocks=round(f['blocks'] / 1e6, 2), decoder_mflops_total=round(f['total'] / 1e6, 2),
                decoder_params=sum(p.numel() for p in model.decoder.parameters()), steps=res['step'],
                train_min=round(res['train_time_s'] / 60, 1), run=os.path.relpath(run_dir, ROOT))


def trivial_miou(data: str) -> float:
    """mIoU of predicting 'background' everywhere on the validation scenes."""
    import torch
    from timm_cbsa.data.ade20k import ADE20KSegmentation
    from timm_cbsa.segmentation import confusion_matrix, segmentation_metrics
    ds = ADE20KSegmentation(data, 'validation')
    conf = torch.zeros(11, 11, dtype=torch.int64)
    for i in range(len(ds)):
        label = torch.from_numpy(ds.load(i)[1].astype('int64'))
        conf += confusion_matrix(torch.zeros_like(label), label, 11)
    return segmentation_metrics(conf)['mIoU']


def scenes_figure(a, path: str, n: int = 6) -> str:
    """Validation scenes, their labels and the predictions of the stage's runs (one row each)."""
    import numpy as np
    import torch
    from timm_cbsa.analysis.plots import _plt, _save
    from timm_cbsa.data.ade20k import ADE20KSegmentation, eval_transform
    from timm_cbsa.segmentation import segmenter_from_config
    plt = _plt()
    raw = ADE20KSegmentation(a.data, 'validation', max_samples=n)
    rows = [('scene', None), ('label', None)] + [(DECODERS[d][1], d) for d in a.decoders]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.7 * len(rows)))
    from matplotlib.colors import ListedColormap
    cmap = ListedColormap(list(plt.get_cmap('tab20').colors[:11]) + [(1.0, 1.0, 1.0)])
    for r, (title, dec) in enumerate(rows):
        if dec is not None:
            ckpt = torch.load(os.path.join(a.work, dec if a.stage == 'joint' else f'frozen_{dec}', 'model_best.pth.tar'),
                              map_location='cpu', weights_only=True)
            model = segmenter_from_config(ckpt['segmenter_config'])
            model.load_state_dict(ckpt['state_dict'])
            tf = eval_transform(ckpt['args']['crop_size'], ckpt['args']['mean'], ckpt['args']['std'])
        for i in range(n):
            image, label = raw.load(i)
            if dec is None:
                shown = np.asarray(image) if r == 0 else np.where(label == 255, 11, label)
            else:
                with torch.no_grad():
                    shown = model.eval()(tf(image, label)[0][None]).argmax(1)[0].numpy()
            ax = axes[r, i]
            ax.imshow(shown, cmap=None if r == 0 else cmap, vmin=0, vmax=11, interpolation='nearest')
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title.replace(' mask transformer', '\nmask transf.'), fontsize=7)
    fig.suptitle(f'composed garment scenes (validation), {a.stage} stage; colours: classes, white: ignored', fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 110)


def main(argv=None):
    a = build_parser().parse_args(argv)
    from _common import markdown_table, write_csv
    if not os.path.isdir(os.path.join(a.data, 'ADEChallengeData2016')):
        from timm_cbsa.data.garment_scenes import write_garment_scenes
        write_garment_scenes(a.data, a.train, a.val)
    rows = train_all(a)
    base = trivial_miou(a.data)
    rows.append(dict(stage=a.stage, decoder='trivial: all background', mIoU=round(base, 2)))
    write_csv(os.path.join(a.out, f'seg_garments_{a.stage}.csv'), rows)
    header = ['decoder', 'val mIoU (last)', 'best', 'pixel acc', 'mAcc', 'decoder MFLOPs (blocks)',
              'decoder MFLOPs (total)', 'decoder params', 'steps', 'train min']
    keys = ['decoder', 'mIoU', 'best_mIoU', 'pixel_acc', 'mAcc', 'decoder_mflops_blocks', 'decoder_mflops_total',
            'decoder_params', 'steps', 'train_min']
    table = markdown_table(header, [[str(r.get(k, '')) for k in keys] for r in rows])
    with open(os.path.join(a.out, f'seg_garments_{a.stage}.md'), 'w') as f:
        f.write(table + '\n')
    print(table, flush=True)
    if a.figure:
        os.makedirs(a.images, exist_ok=True)
        scenes_figure(a, os.path.join(a.images, f'garment_scenes_{a.stage}.png'))
    noisy = [d for d in a.decoders if d != 'linear']
    if noisy and not a.skip_robustness:
        from timm_cbsa.analysis.cli import main as analysis   # raises on bad input (the CLI turns it into status 2)
        name = f'robustness_garments_{a.stage}'
        runs = [os.path.join(a.work, d if a.stage == 'joint' else f'frozen_{d}', 'model_best.pth.tar') for d in noisy]
        analysis(['robustness', '--checkpoint', *runs, '--labels', *[DECODERS[d][1] for d in noisy],
                  '--seeds', *map(str, a.seeds), '--out', a.out, '--name', name]
                 + ([] if a.max_samples is None else ['--max-samples', str(a.max_samples)]))
        os.makedirs(a.images, exist_ok=True)
        os.replace(os.path.join(a.out, f'{name}.png'), os.path.join(a.images, f'{name}.png'))


if __name__ == '__main__':
    main()
