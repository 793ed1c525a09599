"""User images for predict: read them (files, folders, arrays) and bring them to MNIST form.

MNIST itself was made from scanned digits by fitting each one, aspect kept, into a 20x20 box
(anti-aliased, hence the gray levels) and placing that box in a 28x28 field so that the centre of
mass of the ink sits at the field's centre. `to_mnist` does the same to any picture of a digit:
grayscale, light ink on a dark background, cropped to the ink, fit to 20x20, centred by mass.
Arrays (.npy/.npz) are taken to be in MNIST form already, like the dataset's own arrays.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import os
import struct
import warnings

import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff')
ARRAY_EXTENSIONS = ('.npy', '.npz')
SIZE, BOX = 28, 20  # the MNIST field and the box the digit is fit into
# MNIST's centres of mass average (14.0, 14.0) in 0-based pixel coordinates, with the spread of
# a rounding error (std 0.29): digits were shifted by whole pixels to put the centre there.
CENTRE = 14.0
INK_THRESHOLD = 0.25  # share of the ink's peak that counts as ink when cropping
MIN_CONTRAST = 0.1    # less peak-to-background difference than this is a blank picture
NOT_AN_IMAGE = 'not an image (expected PNG, JPEG, BMP, GIF or TIFF, or a .npy/.npz array)'


class InputError(ValueError):
  """An input that cannot be classified; the message is the reason, one line."""


@dataclasses.dataclass
class Inputs:
  names: list[str]          # one per image: the path, or `file.npy[3]` for row 3 of an array
  images: np.ndarray        # (N, 28, 28) uint8, MNIST form
  errors: list[tuple[str, str]]  # (path, reason) of each input that could not be read


# ---------------------------------------------------------------------------------------------
# Pixels to MNIST form


def _ink(gray: np.ndarray) -> np.ndarray:
  """[0, 1] grayscale -> ink 1, background 0, whatever the polarity and exposure of the input."""
  border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
  if np.median(border) > 0.5:  # dark digit on light paper: MNIST's ink is light
    gray, border = 1.0 - gray, 1.0 - border
  background, peak = float(np.median(border)), float(gray.max())
  if peak - background < MIN_CONTRAST:
    raise InputError('blank image: no digit found')
  return np.clip((gray - background) / (peak - background), 0.0, 1.0)


def _crop_to_ink(ink: np.ndarray) -> np.ndarray:
  rows, cols = np.nonzero(ink >= INK_THRESHOLD)
  return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _fit_box(ink: np.ndarray) -> np.ndarray:
  """Scales so the longer side is BOX pixels; the filter averages, so edges turn gray."""
  from PIL import Image
  h, w = ink.shape
  scale = BOX / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  fitted = np.asarray(Image.fromarray(ink.astype(np.float32), 'F').resize(
      size, Image.Resampling.LANCZOS), np.float32)
  fitted = np.clip(fitted, 0.0, 1.0)  # Lanczos overshoots a little at sharp edges
  # Thin strokes of a large picture fade when shrunk; MNIST's strokes peak at full white.
  return fitted / max(float(fitted.max()), 1e-6)


def _centre_by_mass(box: np.ndarray) -> np.ndarray:
  """Pastes `box` into a SIZE x SIZE field, shifted by whole pixels to put its mass at CENTRE."""
  rows, cols = np.indices(box.shape)
  mass = box.sum()
  top = int(round(CENTRE - (rows * box).sum() / mass))
  left = int(round(CENTRE - (cols * box).sum() / mass))
  field = np.zeros((SIZE, SIZE), np.float32)
  # A lopsided digit (a 7's heavy top) may be pushed past the edge: that part is cut, as in MNIST.
  r0, c0 = max(top, 0), max(left, 0)
  r1, c1 = min(top + box.shape[0], SIZE), min(left + box.shape[1], SIZE)
  field[r0:r1, c0:c1] = box[r0 - top:r1 - top, c0 - left:c1 - left]
  return field


def to_mnist(gray: np.ndarray) -> np.ndarray:
  """(H, W) grayscale in [0, 1], any polarity -> (28, 28) uint8 in MNIST form."""
  field = _centre_by_mass(_fit_box(_crop_to_ink(_ink(gray))))
  return np.round(field * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Image files to grayscale


def _flatten_alpha(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """Lays a see-through picture on a background, so what shows is what a viewer would see.

  The colour under transparent pixels is arbitrary (often black, even under black ink), so the
  background is chosen from the opaque pixels: strokes on a clear sheet get the contrasting tone;
  an opaque picture with a few clear pixels gets its own dominant tone.
  """
  if alpha.min() >= 1.0:
    return gray
  opaque = alpha > 0.5
  tone = float(np.median(gray[opaque])) if opaque.any() else 0.0
  light = tone < 0.5 if opaque.mean() < 0.5 else tone >= 0.5
  return gray * alpha + float(light) * (1.0 - alpha)


def _grayscale(img) -> np.ndarray:
  """A decoded PIL image of any mode -> (H, W) float32 in [0, 1]."""
  if img.mode.startswith('I;16'):
    return np.asarray(img, np.float32) / 65535.0
  if img.mode in ('I', 'F'):  # 32-bit modes: 16-bit files read by older decoders, float TIFFs
    values = np.asarray(img, np.float32)
    full_scale = 1.0 if img.mode == 'F' and values.max() <= 1.0 else 65535.0
    return np.clip(values / max(full_scale, float(values.max())), 0.0, 1.0)
  if 'A' in img.mode or 'transparency' in img.info:
    rgba = np.asarray(img.convert('RGBA'), np.float32) / 255.0
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)  # the weights of PIL's 'L'
    return _flatten_alpha(luma, rgba[..., 3])
  return np.asarray(img.convert('L'), np.float32) / 255.0


def _header_size(head: bytes) -> tuple[str, tuple[int, int] | None] | None:
  """(format, (width, height) if the header gives it) of a file Pillow refused, or None."""
  if head.startswith(b'\x89PNG\r\n\x1a\n'):
    has_size = head[12:16] == b'IHDR' and len(head) >= 24
    return 'PNG', struct.unpack('>II', head[16:24]) if has_size else None
  if head[:6] in (b'GIF87a', b'GIF89a'):
    return 'GIF', struct.unpack('<HH', head[6:10]) if len(head) >= 10 else None
  if head.startswith(b'BM') and len(head) >= 26:  # height is negative in top-down bitmaps
    return 'BMP', tuple(abs(v) for v in struct.unpack('<ii', head[18:26]))
  if head.startswith(b'\xff\xd8\xff'):
    return 'JPEG', None
  if head[:4] in (b'II*\0', b'MM\0*'):
    return 'TIFF', None
  return None


def _diagnose(raw: bytes, error: Exception) -> str:
  """Why Pillow could not identify a file: zero-size, damaged, or not an image at all."""
  known = _header_size(raw[:32])
  if known is None:
    return NOT_AN_IMAGE
  fmt, size = known
  if size is not None and 0 in size:
    return f'zero-size image ({size[0]}x{size[1]} pixels)'
  return f'damaged {fmt} file ({_one_line(error)})'


def _one_line(error: Exception) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return text[:200]


MAX_PIXELS = 250_000_000  # a picture this large (e.g. 15,000 x 15,000) still decodes in ~1 GB


def read_image(path: str) -> np.ndarray:
  """An image file -> (H, W) float32 grayscale in [0, 1]; InputError says why it can't be read."""
  from PIL import Image, ImageOps, UnidentifiedImageError
  Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # Pillow refuses at twice this: at MAX_PIXELS
  raw = _read_bytes(path)
  warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # large, but allowed
  try:
    img = Image.open(io.BytesIO(raw))
  except UnidentifiedImageError as e:
    raise InputError(_diagnose(raw, e)) from e
  except Image.DecompressionBombError as e:
    raise InputError(f'a picture of more than {MAX_PIXELS // 1_000_000} megapixels; scale it '
                     f'down first') from e
  except (OSError, SyntaxError, ValueError) as e:
    raise InputError(f'unreadable image ({_one_line(e)})') from e
  if 0 in img.size:
    raise InputError(f'zero-size image ({img.size[0]}x{img.size[1]} pixels)')
  try:
    img.load()  # decodes everything now, so a truncated file fails here, not half-read
    img = ImageOps.exif_transpose(img)  # phone photos store "rotate me" in a tag
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    message = _one_line(e)
    kind = 'truncated' if 'truncated' in message else 'damaged'
    raise InputError(f'{kind} {img.format or "image"} file ({message})') from e
  return _grayscale(img)


MAX_BYTES = 2 ** 31  # 2 GiB: past MAX_PIXELS in any picture format, or 2.7 million 28x28 images


def _read_bytes(path: str) -> bytes:
  """The file's bytes, read in pieces up to MAX_BYTES (a device such as /dev/zero never ends)."""
  pieces, size = [], 0
  try:
    with open(path, 'rb') as f:
      while piece := f.read(min(1 << 26, MAX_BYTES + 1 - size)):
        pieces.append(piece)
        size += len(piece)
        if size > MAX_BYTES:
          limit = f'{MAX_BYTES >> 30} GiB' if MAX_BYTES >= 1 << 30 else f'{MAX_BYTES >> 20} MiB'
          raise InputError(f'larger than {limit}; split it or scale it down')
  except OSError as e:
    raise InputError(f'cannot read ({e.strerror or _one_line(e)})') from e
  if not size:
    raise InputError('empty file')
  return b''.join(pieces)


# ---------------------------------------------------------------------------------------------
# Arrays


def _as_mnist_pixels(array: np.ndarray) -> np.ndarray:
  """(28, 28), (N, 28, 28) or (N, 28, 28, 1) numbers -> (N, 28, 28) uint8; [0, 1] floats scaled."""
  if array.ndim == 4 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or array.shape[-2:] != (SIZE, SIZE):
    raise InputError(f'array of shape {array.shape}; expected 28x28 images, shape (N, 28, 28)')
  if array.dtype == np.uint8:
    return array.reshape((-1, SIZE, SIZE))
  if array.dtype.kind not in 'biuf':
    raise InputError(f'array of {array.dtype}; expected numbers')
  values = array.astype(np.float64).reshape((-1, SIZE, SIZE))
  if not np.isfinite(values).all():
    raise InputError('array holds NaN or infinite values')
  if array.dtype.kind in 'bf' and values.size and values.max() <= 1.0:
    values = values * 255.0  # [0, 1] floats, as many pipelines keep images
  if values.size and (values.min() < 0 or values.max() > 255):
    raise InputError(f'array values span {array.min():g}..{array.max():g}; expected 0..255 '
                     f'or 0..1')
  return np.round(values).astype(np.uint8)


def _row_names(name: str, array: np.ndarray, count: int) -> list[str]:
  return [name] if array.ndim == 2 else [f'{name}[{i}]' for i in range(count)]


def read_array(path: str) -> tuple[list[str], np.ndarray]:
  """A .npy/.npz of 28x28 images -> (row names, (N, 28, 28) uint8).

  In a .npz with several arrays, those shaped like images are read (an `x_test` beside its
  `y_test` labels, say) and rows are named `file.npz[key][i]`.
  """
  raw = _read_bytes(path)
  try:
    loaded = np.load(io.BytesIO(raw), allow_pickle=False)  # pickles could run code
    if isinstance(loaded, np.ndarray):
      arrays = {None: loaded}
    else:
      arrays = {key: loaded[key] for key in loaded.files}
  except Exception as e:  # numpy raises ValueError, EOFError, OSError, zipfile errors...
    raise InputError(f'damaged or unsupported array file ({_one_line(e)})') from e
  names, images, rejected = [], [], []
  for key, array in arrays.items():
    try:
      pixels = _as_mnist_pixels(array)
      if not len(pixels):
        raise InputError('array holds no images')
    except InputError as e:
      rejected.append(f'{key}: {e}' if key else str(e))
      continue
    prefix = path if key is None or len(arrays) == 1 else f'{path}[{key}]'
    names += _row_names(prefix, array, len(pixels))
    images.append(pixels)
  if not images:
    raise InputError('; '.join(rejected) or 'no arrays in the file')
  pixels = np.concatenate(images)
  blank = np.ptp(pixels.reshape(len(pixels), -1), axis=1) == 0
  errors = [(name, 'blank image: no digit found') for name, b in zip(names, blank) if b]
  return [n for n, b in zip(names, blank) if not b], pixels[~blank], errors


# ---------------------------------------------------------------------------------------------
# Paths


def _is_array(path: str) -> bool:
  return path.lower().endswith(ARRAY_EXTENSIONS)


def expand(paths: list[str]) -> list[tuple[str, str | None]]:
  """(path, None) for each file to read, or (path, reason) when the path itself is wrong.

  A folder stands for its image and array files (by extension, sorted, not recursive).
  """
  files = []
  for path in paths:
    if os.path.isdir(path):
      names = sorted(n for n in os.listdir(path) if not n.startswith('.')
                     and n.lower().endswith(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS))
      if not names:
        files.append((path, 'no image or array files in this folder'))
      files += [(os.path.join(path, n), None) for n in names]
    elif os.path.exists(path):
      files.append((path, None))
    else:
      files.append((path, _missing(path)))
  return files


def _missing(path: str) -> str:
  """Why a path that does not exist as a file or folder cannot be read."""
  try:
    os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      return 'a loop of symbolic links'
    if os.path.islink(path):
      return f'a symbolic link to {os.readlink(path)}, which does not exist'
    if e.errno in (errno.EACCES, errno.EPERM):
      return f'cannot read ({e.strerror})'
  return 'no such file or folder'


def read_inputs(paths: list[str]) -> Inputs:
  """Every readable input in MNIST form; the others are listed with their reasons."""
  names, images, errors = [], [], []
  for path, problem in expand(paths):
    try:
      if problem:
        raise InputError(problem)
      if _is_array(path):
        rows, pixels, blank = read_array(path)
        errors += blank
      else:
        rows, pixels = [path], to_mnist(read_image(path))[None]
    except InputError as e:
      errors.append((path, str(e)))
      continue
    names += rows
    images.append(pixels)
  stacked = np.concatenate(images) if images else np.zeros((0, SIZE, SIZE), np.uint8)
  return Inputs(names, stacked, errors)
