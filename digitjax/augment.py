"""On-device augmentation: random affine transforms (rotation, zoom, shift) of image batches.

A pure function of (key, images), jitted inside the train step; keys come from (seed, step), so
a resumed run sees the same transforms as an uninterrupted one.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AffineRanges(NamedTuple):
  """Keras ImageDataGenerator-style ranges: rotation in degrees, zoom and shift as fractions."""
  rotation: float = 10.0
  zoom: float = 0.1
  shift: float = 0.1


def affine(images_BxHxWxC, angle_B, scale_B, shift_Bx2):
  """Rotates by `angle` (radians, counter-clockwise) and scales by `scale` about the centre,
  then shifts by (dy, dx) pixels; bilinear sampling, zeros outside. Identity is exact."""
  b, h, w, c = images_BxHxWxC.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0

  def one(image_HxWxC, angle, scale, shift):
    # Output pixel p takes the input at A^-1 (p - centre - shift) + centre.
    y, x = ys - cy - shift[0], xs - cx - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_y = (cos * y + sin * x) / scale + cy
    src_x = (-sin * y + cos * x) / scale + cx
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, [src_y, src_x], order=1, mode='constant', cval=0.0)
    return jnp.stack([sample(image_HxWxC[..., k]) for k in range(c)], axis=-1)

  return jax.vmap(one)(images_BxHxWxC, angle_B, scale_B, shift_Bx2)


def random_affine(key, images_BxHxWxC, ranges: AffineRanges):
  """Each image gets its own rotation, zoom and shift drawn uniformly from `ranges`."""
  b, h, w, _ = images_BxHxWxC.shape
  k_angle, k_zoom, k_shift = jax.random.split(key, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-ranges.rotation,
                                         maxval=ranges.rotation))
  scale = 1.0 + jax.random.uniform(k_zoom, (b,), minval=-ranges.zoom, maxval=ranges.zoom)
  shift = jax.random.uniform(k_shift, (b, 2), minval=-ranges.shift, maxval=ranges.shift)
  return affine(images_BxHxWxC, angle, scale, shift * jnp.array([h, w], jnp.float32))
