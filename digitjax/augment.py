"""On-device augmentation of image batches: random affine transforms (rotation, zoom, shift),
elastic distortion (Simard, Best & Platt 2003) and stroke-width changes (grey-scale dilation and
erosion); the fixed views of test-time augmentation; and the stresses (STRESSES), fixed shifts
of distribution that measure robustness to other handwriting (benchmarks/robustness.py).

Pure functions of (key, images), jitted inside the train step; keys come from (seed, step), so
a resumed run sees the same transforms as an uninterrupted one.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

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


# ---------------------------------------------------------------------------------------------
# Elastic distortion


def gaussian_matrix(size: int, sigma):
  """(size, size) matrix G with G @ v = v blurred by a Gaussian of standard deviation `sigma`
  (pixels), zeros outside (scipy.ndimage.gaussian_filter's mode='constant', untruncated).
  `sigma` may be a traced number (a vmapped group's)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  weight = lambda d: jnp.exp(-0.5 * jnp.square(d / sigma))
  # The kernel's sum over all offsets (2 * 128 + 1 cover 4.5 sigma for sigma <= 28).
  total = weight(jnp.arange(-128, 129, dtype=jnp.float32)).sum()
  i = jnp.arange(size, dtype=jnp.float32)
  return weight(i[:, None] - i[None, :]) / total


def smooth_field(key, batch: int, size: int, sigma):
  """Simard et al.'s displacement fields: uniform in [-1, 1] per pixel and axis, blurred by a
  Gaussian of `sigma` pixels (separably: G F G^T). (batch, size, size, 2): (dy, dx) of each
  pixel, before scaling by alpha."""
  noise = jax.random.uniform(key, (batch, 2, size, size), minval=-1.0, maxval=1.0)
  g = gaussian_matrix(size, sigma)
  smooth = jnp.einsum('ij,bcjk,lk->bcil', g, noise, g)
  return jnp.moveaxis(smooth, 1, -1)


def displace(images_BxHxWxC, field_BxHxWx2):
  """Output pixel p takes the input at p + field[p] (pixels; bilinear, zeros outside)."""
  _, h, w, c = images_BxHxWxC.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')

  def one(image_HxWxC, field_HxWx2):
    coords = [ys + field_HxWx2[..., 0], xs + field_HxWx2[..., 1]]
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, coords, order=1, mode='constant', cval=0.0)
    return jnp.stack([sample(image_HxWxC[..., k]) for k in range(c)], axis=-1)

  return jax.vmap(one)(images_BxHxWxC, field_BxHxWx2)


def random_elastic(key, images_BxHxWxC, alpha, sigma):
  """Each image displaced by its own smooth random field (smooth_field) scaled by `alpha`
  pixels: Simard et al. used alpha 34, sigma 4 on MNIST."""
  b, h, w, _ = images_BxHxWxC.shape
  assert h == w, 'square images'
  return displace(images_BxHxWxC, alpha * smooth_field(key, b, h, sigma))


# ---------------------------------------------------------------------------------------------
# Stroke width


def _window_2x2(images_BxHxWxC, reduce, rows: int, cols: int):
  """`reduce` (maximum or minimum) over each pixel's 2x2 window reaching `rows`/`cols` (+1 or
  -1) pixels away; zeros (background) outside the image."""
  h, w = images_BxHxWxC.shape[1:3]
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  at = lambda dy, dx: padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
  return reduce(reduce(at(0, 0), at(rows, 0)), reduce(at(0, cols), at(rows, cols)))


def dilate(images_BxHxWxC):
  """Grey-scale dilation by the 2x2 square B = {0, 1}^2, max of x[p - b]: strokes one pixel
  thicker, grown down and right."""
  return _window_2x2(images_BxHxWxC, jnp.maximum, -1, -1)


def erode(images_BxHxWxC):
  """Grey-scale erosion by the same square, min of x[p + b]: strokes one pixel thinner, worn
  from the bottom and right (dilation's adjoint: a digit's centre moves half a pixel either
  way, so on average not at all)."""
  return _window_2x2(images_BxHxWxC, jnp.minimum, 1, 1)


def random_stroke(key, images_BxHxWxC, probability):
  """Each image thickened (dilate) with `probability`, thinned (erode) with `probability`,
  else left as it is (so `probability` <= 0.5)."""
  u = jax.random.uniform(key, images_BxHxWxC.shape[:1])[:, None, None, None]
  return jnp.where(u < probability, dilate(images_BxHxWxC),
                   jnp.where(u >= 1.0 - probability, erode(images_BxHxWxC), images_BxHxWxC))


# ---------------------------------------------------------------------------------------------
# Test-time augmentation


# The views of test-time augmentation, in order: (rotation in degrees counter-clockwise, shift
# down, shift right in pixels). The first N are used; the first is the image itself.
TTA_VIEWS = ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0),
             (0.0, -1.0, 0.0), (10.0, 0.0, 0.0), (-10.0, 0.0, 0.0))


def describe_view(view) -> str:
  angle, dy, dx = view
  if angle:
    return f'rotated {angle:+g} deg'
  if dy or dx:
    return f'shifted {"down" if dy > 0 else "up" if dy else "right" if dx > 0 else "left"} 1 px'
  return 'identity'


def view(images_BxHxWxC, view_):
  """All images seen as TTA_VIEWS' `view_` (angle, dy, dx): Python numbers or an array of the
  three (traced: one program for every view); integer shifts move pixels exactly (bilinear
  sampling at whole pixels)."""
  angle, dy, dx = view_
  return _affine_all(images_BxHxWxC, angle, shift=(dy, dx))


# ---------------------------------------------------------------------------------------------
# Stresses: fixed shifts of distribution, to measure robustness


class Stress(NamedTuple):
  """A named, deterministic change of every image (no random numbers): `apply` maps pixel
  values (B, H, W, C), float32 in [0, 255], to the same."""
  description: str
  apply: Callable


def _affine_all(images_BxHxWxC, degrees=0.0, scale=1.0, shift=(0.0, 0.0)):
  """augment.affine with one angle, scale and (dy, dx) shift for every image."""
  b = images_BxHxWxC.shape[0]
  return affine(images_BxHxWxC, jnp.full((b,), jnp.deg2rad(degrees), jnp.float32),
                jnp.full((b,), scale, jnp.float32),
                jnp.tile(jnp.array([shift], jnp.float32), (b, 1)))


def slant(images_BxHxWxC, shear):
  """Horizontal shear about the centre row, bilinear, zeros outside: row y moves shear * (cy
  - y) pixels right, so shear > 0 slants a digit like italics (its top to the right)."""
  b, h, w, _ = images_BxHxWxC.shape
  dx = shear * (jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2.0)  # input column offset per row
  field = jnp.stack(jnp.broadcast_arrays(jnp.zeros((h, w)), dx[:, None]), axis=-1)
  return displace(images_BxHxWxC, jnp.broadcast_to(field, (b, h, w, 2)))


# The sides off_centre moves a digit toward, in the order ties are broken: (dy, dx).
_SIDES = ((0, 1), (1, 0), (0, -1), (-1, 0))  # right, down, left, up


def off_centre(images_BxHxWxC, least=4, most=6):
  """Each image moved by whole pixels (exactly, no resampling) toward the side of the frame its
  ink (pixels > 0) is farthest from: by that distance, but at least `least` and at most `most`
  pixels. Ink leaves the frame only where the digit has less than `least` pixels of room on
  every side; an empty image stays empty."""
  ink = images_BxHxWxC.max(-1) > 0
  # Empty rows (columns) after the last inked one and before the first, per image.
  room = lambda inked: (jnp.argmax(inked[:, ::-1], -1), jnp.argmax(inked, -1))
  below, above = room(ink.any(2))
  right, left = room(ink.any(1))
  rooms = jnp.stack([right, below, left, above], -1)  # in _SIDES' order
  side = jnp.argmax(rooms, -1)  # the first of the largest
  b = images_BxHxWxC.shape[0]
  distance = jnp.clip(rooms[jnp.arange(b), side], least, most).astype(jnp.float32)
  shift = jnp.asarray(_SIDES, jnp.float32)[side] * distance[:, None]
  return affine(images_BxHxWxC, jnp.zeros((b,), jnp.float32), jnp.ones((b,), jnp.float32), shift)


# Shifts of distribution toward handwriting that is not MNIST's, in the order reports list them.
STRESSES = {
    'thick': Stress('strokes 1 px thicker: dilate once (2x2)', dilate),
    'thicker': Stress('strokes 2 px thicker: dilate twice, moved back 1 px up and left (a '
                      'centred 3x3 dilation)',
                      lambda x: _affine_all(dilate(dilate(x)), shift=(-1.0, -1.0))),
    'thin': Stress('strokes 1 px thinner: erode once (2x2)', erode),
    'slant_right': Stress('slanted like italics: sheared 0.3 (each row up 0.3 px further '
                          'right)', lambda x: slant(x, 0.3)),
    'slant_left': Stress('slanted backwards: sheared -0.3', lambda x: slant(x, -0.3)),
    'off_centre': Stress('moved 4-6 whole px toward the side of the frame with the most room '
                         '(inside the frame where 4 px allow)', off_centre),
    'rotate_ccw': Stress('rotated 20 deg counter-clockwise', lambda x: _affine_all(x, 20.0)),
    'rotate_cw': Stress('rotated 20 deg clockwise', lambda x: _affine_all(x, -20.0)),
    'small': Stress('scaled 0.75 about the centre', lambda x: _affine_all(x, scale=0.75)),
    'large': Stress('scaled 1.2 about the centre', lambda x: _affine_all(x, scale=1.2)),
}


def stressed(images_BxHxWxC, name: str):
  """The images under STRESSES[name], in their own dtype: an integer dtype's values (uint8,
  as the splits hold them) rounded to the nearest and kept in [0, 255], as an image file
  would hold them. A KeyError names an unknown stress."""
  if name not in STRESSES:
    raise KeyError(f'unknown stress {name!r}: one of {", ".join(STRESSES)}')
  x = jnp.asarray(images_BxHxWxC)
  out = _compiled_stress(name)(x.astype(jnp.float32))
  return (jnp.round(out) if jnp.issubdtype(x.dtype, jnp.integer) else out).astype(x.dtype)


@functools.cache
def _compiled_stress(name: str):
  """STRESSES[name], clipped to [0, 255], as one compiled program (per shape)."""
  return jax.jit(lambda x: jnp.clip(STRESSES[name].apply(x), 0.0, 255.0))
