"""A tiny ADE20K-layout folder for the segmentation tests (random RGB images, annotations with values 0..150)."""
import os

import numpy as np
from PIL import Image


def write_ade_folder(root, n_train=3, n_val=2, size=(24, 36), seed=0):
    """A tiny ADEChallengeData2016 tree: random RGB jpgs, png annotations with values 0..150."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, 'ADEChallengeData2016')
    anns = {}
    for split, n in (('training', n_train), ('validation', n_val)):
        for k in ('images', 'annotations'):
            os.makedirs(os.path.join(base, k, split), exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            ann = rng.choice(np.array([0, 1, 2, 75, 150], dtype=np.uint8), size=size)
            Image.fromarray(img).save(os.path.join(base, 'images', split, f'ADE_{split}_{i:04d}.jpg'))
            Image.fromarray(ann).save(os.path.join(base, 'annotations', split, f'ADE_{split}_{i:04d}.png'))
            anns[(split, i)] = ann
    return base, anns
