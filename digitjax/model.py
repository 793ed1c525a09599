"""The tutorial's CNN as a flax.linen module, with CPU-friendly layer formulations.

Conv32(3x3)-ReLU-MaxPool2-Conv64-ReLU-Conv64-ReLU-MaxPool2-Flatten-Dense100-ReLU-Dense10:
159,254 parameters, the same names and shapes whichever formulation runs, so checkpoints are
interchangeable between them.

`dtype` is the computation's (Flax's dtype/param_dtype convention): 'bfloat16' runs the
activations and every matrix product in bfloat16, layer to layer, while the parameters stay
float32 (each layer casts its kernel for the product; its gradient comes back as float32) and
the logits leave the module as float32, so the softmax and the loss are float32 either way.
The parameters, and so the checkpoints, are the same whatever the dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from digitjax.configlib import conv_impls

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _im2col_covers(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, kwargs) -> bool:
  """Stride 1, VALID, no dilation or groups, NHWC x HWIO: what the matmul formulations handle."""
  return (tuple(window_strides) == (1, 1)
          and padding in ('VALID', ((0, 0), (0, 0)), [(0, 0), (0, 0)])
          and all(d in (None, 1) for d in (lhs_dilation or ()) + (rhs_dilation or ()))
          and feature_group_count == 1 and kwargs.get('batch_group_count', 1) == 1
          and (dimension_numbers is None
               or tuple(dimension_numbers) == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                                          _NHWC)))


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` for NHWC x HWIO, stride 1, VALID, as shifted slices + one matmul.

  On CPU its gradients are 1.5-2x faster than XLA's convolution (benchmarks/layers.py). Any case
  it does not cover goes to `lax.conv_general_dilated` unchanged.
  """
  if not _im2col_covers(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, kwargs):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    **kwargs)
  kh, kw, cin, cout = rhs.shape
  kernel_KxO = rhs.reshape(kh * kw * cin, cout)
  if lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16:
    return bf16_conv(lhs, rhs, jnp.zeros((cout,), rhs.dtype))
  return _patch_matmul(_patches(lhs, kh, kw), kernel_KxO, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _patch_matmul(patches_BxHxWxK, kernel_KxO, precision=None):
  """patches @ kernel, with the kernel's gradient computed as (dy^T . patches)^T.

  JAX's own rule gives patches^T . dy, a product whose left operand is transposed: XLA:CPU runs
  that one on Eigen and not on YNNPACK, which does the plain row-major product in ~2/3 of the
  time (conv3's kernel gradient for 16 images: 0.75 vs 1.13 ms on one core; benchmarks/layers.py
  times both rules). The optimization barrier keeps XLA from folding the small transpose of the
  result back into the product. The same sums, so the same gradient up to float rounding.
  """
  return jnp.dot(patches_BxHxWxK, kernel_KxO, precision=precision)


def _patch_matmul_fwd(patches, kernel, precision):
  return _patch_matmul(patches, kernel, precision), (patches, kernel)


def _patch_matmul_bwd(precision, residuals, dy_BxHxWxO):
  patches, kernel = residuals
  d_patches = jnp.dot(dy_BxHxWxO, kernel.T, precision=precision)
  rows_NxK = patches.reshape(-1, patches.shape[-1])
  dy_NxO = dy_BxHxWxO.reshape(-1, dy_BxHxWxO.shape[-1])
  d_kernel = lax.optimization_barrier(jnp.dot(dy_NxO.T, rows_NxK, precision=precision)).T
  return d_patches, d_kernel


_patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)


def _patches(x_BxHxWxC, kh: int, kw: int):
  """(B, OH, OW, kh*kw*C): the VALID windows, in the (i, j, c) order of a row-major HWIO kernel.

  A single-channel map's windows are built in two stages, the kw column shifts and then the kh
  row shifts of those: the same array, faster than kh*kw one-wide slices (configs/speedrun.py's
  5x5 conv1 at batch 32 with its product: 0.23 vs 0.38 ms; its whole steps 2.86 vs 3.15 ms; the
  tutorial's within noise); with more channels one stage is faster (0.33 vs 0.26 ms).
  """
  _, h, w, c = x_BxHxWxC.shape
  oh, ow = h - kh + 1, w - kw + 1
  if c == 1:
    columns = jnp.concatenate([x_BxHxWxC[:, :, j:j + ow, :] for j in range(kw)], axis=-1)
    return jnp.concatenate([columns[:, i:i + oh] for i in range(kh)], axis=-1)
  return jnp.concatenate(
      [x_BxHxWxC[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)


# bfloat16 on XLA:CPU. A product of bfloat16 operands with float32 sums (preferred_element_type)
# runs on YNNPACK's bfloat16 kernels, 1.5-1.8x faster than the float32 product for this model's
# shapes; but most other bfloat16 operations, a bf16 -> bf16 product included, XLA:CPU computes
# in float32 between conversions (each slice of a concatenation converted there and back), and
# a bias gradient's reduction over converted values it fused into the optimizer's update as a
# slow loop. So the bfloat16 convolution is one custom_vjp: data moved as 16-bit integers
# (slices, concatenation, transposes), products summed in float32 and rounded once, the bias
# added to the float32 sums, the patches' gradients summed in float32, and the kernel's and
# bias's gradients returned in float32 (benchmarks/precision.py times whole steps).


def _bits(x):
  return lax.bitcast_convert_type(x, jnp.uint16)


def _bf16(bits):
  return lax.bitcast_convert_type(bits, jnp.bfloat16)


def _row_major_transpose(x_NxM):
  """x^T of a bfloat16 matrix as a row-major array, not a view XLA folds into its consumer."""
  n, m = x_NxM.shape
  return _bf16(lax.optimization_barrier(_bits(x_NxM).T.reshape(-1)).reshape(m, n))


def _dot_f32(a, b):
  """a . b of bfloat16 operands, summed in float32 (a float32 result)."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_conv(x_BxHxWxC, kernel_HxWxIxO, bias_O):
  """A stride-1 VALID convolution plus bias of a bfloat16 map, as im2col: bfloat16 products
  with float32 sums, one rounding of each output to bfloat16. The kernel and bias may be
  float32 (parameters): their gradients come back in their own dtype."""
  return _bf16_conv_fwd(x_BxHxWxC, kernel_HxWxIxO, bias_O)[0]


def _bf16_conv_fwd(x, kernel, bias):
  kh, kw, cin, cout = kernel.shape
  patches = _bf16(_patches(_bits(x.astype(jnp.bfloat16)), kh, kw))
  kernel_KxO = kernel.reshape(kh * kw * cin, cout).astype(jnp.bfloat16)
  y = _dot_f32(patches, kernel_KxO) + bias.astype(jnp.float32)
  return y.astype(jnp.bfloat16), (patches, kernel_KxO, jnp.zeros((0,) + kernel.shape,
                                                                 kernel.dtype),
                                  jnp.zeros((0,), bias.dtype), jnp.zeros((0,), x.dtype))


def _bf16_conv_bwd(residuals, dy_BxHxWxO):
  patches, kernel_KxO, kernel_like, bias_like, x_like = residuals
  kh, kw, cin, cout = kernel_like.shape[1:]
  b, oh, ow, _ = patches.shape
  dy_BxHxWxO = dy_BxHxWxO.astype(jnp.bfloat16)
  d_patches = _dot_f32(dy_BxHxWxO, _bf16(_bits(kernel_KxO).T))
  windows = jax.linear_transpose(functools.partial(_patches, kh=kh, kw=kw),
                                 jax.ShapeDtypeStruct((b, oh + kh - 1, ow + kw - 1, cin),
                                                      jnp.float32))
  (dx,) = windows(d_patches)
  # The kernel's gradient, patches^T . dy, as a product of row-major operands (YNNPACK has no
  # transposed left operand; XLA would convert both to float32 for Eigen's). XLA lays a
  # transpose out as a view, so the smaller of the two is transposed into a row-major array
  # (flattened behind a barrier): patches^T for conv1 (9 columns: 0.06 vs 0.17 ms), else dy^T,
  # the product's transpose kept behind a barrier as in `_patch_matmul`.
  dy_NxO = dy_BxHxWxO.reshape(-1, cout)
  rows_NxK = patches.reshape(-1, kh * kw * cin)
  if rows_NxK.shape[1] < cout:
    d_kernel = _dot_f32(_row_major_transpose(rows_NxK), dy_NxO)
  else:
    d_kernel = lax.optimization_barrier(_dot_f32(_row_major_transpose(dy_NxO), rows_NxK)).T
  # The barrier keeps the reduction out of the (loop) fusion of its consumers.
  d_bias = lax.optimization_barrier(jnp.sum(dy_NxO.astype(jnp.float32), axis=0))
  return (dx.astype(x_like.dtype), d_kernel.reshape(kernel_like.shape[1:]).astype(
      kernel_like.dtype), d_bias.astype(bias_like.dtype))


bf16_conv.defvjp(_bf16_conv_fwd, _bf16_conv_bwd)


def dot_general_f32_sums(lhs, rhs, dimension_numbers, precision=None,
                         preferred_element_type=None):
  """lax.dot_general for nn.Dense in bfloat16: float32 sums (YNNPACK's bfloat16 kernels, not
  XLA:CPU's float32 product between conversions), rounded once to the operands' dtype."""
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=jnp.float32).astype(lhs.dtype)


class Bf16Conv(nn.Module):
  """nn.Conv's layer (VALID, stride 1; the same parameters, names, shapes and initializers)
  computed by `bf16_conv`: float32 parameters, a bfloat16 map in and out."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = True
  kernel_init: Any = nn.initializers.he_uniform()

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else jnp.zeros((self.features,), jnp.float32))
    return bf16_conv(x, kernel, bias)


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# 2016): a 2x2 output tile of a 3x3 convolution from a 4x4 input tile with 16 multiplications
# instead of 36. The kernel is transformed by G, each input tile by B^T . B, and the 16 products
# (one matmul over channels each) back by A^T . A. The transforms' coefficients are 0, +-1 and
# +-1/2, so float32 rounding stays at the level of the direct sums'.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` for 3x3 kernels, NHWC x HWIO, stride 1, VALID, by Winograd's
  F(2x2, 3x3): 16 batched matmuls over the channels on 2x2 output tiles, 2.25x fewer
  multiplications than a direct (or im2col) convolution. Odd output sizes get one zero row
  (column) of input and drop the extra output row (column).

  Its gradients are the transposes of these linear maps (also 16 batched matmuls). On this 2-core
  CPU it takes ~20% less CPU time than im2col for conv2's and conv3's forward and backward, but
  its batched matmuls run on one core and its transforms are memory-bound, so the tutorial's
  training step is slower with it (benchmarks/layers.py); with twice the channels it is faster.
  Slow with a single input channel (its matmuls are then outer products). Other convolutions go
  to `im2col_conv`, and from there to XLA's if im2col does not cover them.
  """
  if rhs.shape[:2] != (3, 3) or not _im2col_covers(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, kwargs):
    return im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                       dimension_numbers, feature_group_count, precision, **kwargs)
  b, h, w, cin = lhs.shape
  cout = rhs.shape[-1]
  oh, ow = h - 2, w - 2
  th, tw = (oh + 1) // 2, (ow + 1) // 2  # output tiles down and across
  x = jnp.pad(lhs, ((0, 0), (0, 2 * th - oh), (0, 2 * tw - ow), (0, 0)))
  v = _winograd_input(_winograd_input(x, 1), 3)  # (4 across, 4 down, B, th, tw, Cin)
  g = jnp.asarray(_WINOGRAD_G, rhs.dtype)
  u = jnp.einsum('ai,ijcd,bj->bacd', g, rhs, g, precision=precision)  # (4 across, 4 down, ...)
  m = jnp.einsum('xnc,xcd->xnd', v.reshape(16, b * th * tw, cin), u.reshape(16, cin, cout),
                 precision=precision).reshape(4, 4, b, th, tw, cout)
  # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] down, then across; the output rows and columns of each
  # tile are stacked where they belong, so the final reshape interleaves the tiles.
  rows = jnp.stack([m[:, 0] + m[:, 1] + m[:, 2], m[:, 1] - m[:, 2] - m[:, 3]], axis=3)
  y = jnp.stack([rows[0] + rows[1] + rows[2], rows[1] - rows[2] - rows[3]], axis=4)
  return y.reshape(b, 2 * th, 2 * tw, cout)[:, :oh, :ow, :]


def _winograd_input(x, axis: int):
  """B^T d along `axis` (length 2T + 2) for the T tiles at stride 2, the 4 results stacked on a
  new leading axis. B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]; the tiles'
  rows come from contiguous slices of the even and odd rows (whose transposes are plain pads)."""
  t = x.shape[axis] // 2 - 1
  pairs = x.reshape(x.shape[:axis] + (t + 1, 2) + x.shape[axis + 1:])
  even, odd = (lax.index_in_dim(pairs, k, axis + 1, keepdims=False) for k in (0, 1))
  d0, d2 = (lax.slice_in_dim(even, s, s + t, axis=axis) for s in (0, 1))
  d1, d3 = (lax.slice_in_dim(odd, s, s + t, axis=axis) for s in (0, 1))
  return jnp.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3])


def max_pool_2x2(x_BxHxWxC, impl: str = 'lax'):
  """2x2 max pooling with stride 2 and VALID padding (odd edges dropped, as Keras does).

  'reshape' takes the max over a reshaped view, with a gradient written out (see
  `_reshape_pool_2x2`) that avoids XLA's select_and_scatter (slow on CPU). Both formulations
  give the same outputs and the same gradients, ties included.
  """
  if impl == 'lax':
    return nn.max_pool(x_BxHxWxC, (2, 2), strides=(2, 2), padding='VALID')
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, :h // 2 * 2, :w // 2 * 2, :]
  return _reshape_pool_2x2(x)


@jax.custom_vjp
def _reshape_pool_2x2(x_BxHxWxC):
  """2x2 max pooling of even-sized maps as a max over a reshaped view.

  Its gradient sends `g` to the first maximum of each window in row-major order, as XLA's
  select_and_scatter (nn.max_pool's gradient) does. Ties are common: a blank region after a
  conv with a positive bias is constant, so every input of its windows is a maximum, and a
  rule that gave `g` to each of them would multiply that bias's gradient by 4. The forward pass
  keeps the winner's position (int8), and the backward pass is one broadcast select. (JAX's own
  rule for a reduction's max splits `g` between ties with a second reduction and a division;
  benchmarks/layers.py times the pooling gradients.)
  """
  b, h, w, c = x_BxHxWxC.shape
  return x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_fwd(x_BxHxWxC):
  b, h, w, c = x_BxHxWxC.shape
  window = x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c)
  corners = [window[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]  # row-major window order
  y = functools.reduce(jnp.maximum, corners)
  winner = jnp.full(y.shape, 3, jnp.int8)  # the last corner, unless an earlier one is the max
  for k in (2, 1, 0):
    winner = jnp.where(corners[k] == y, jnp.int8(k), winner)
  return y, winner


def _pool_bwd(winner, g):
  b, h, w, c = winner.shape  # of the pooled map; the input is (b, 2h, 2w, c)
  corner_2x2 = (2 * jnp.arange(2, dtype=jnp.int8)[:, None] + jnp.arange(2, dtype=jnp.int8))
  chosen = winner[:, :, None, :, None, :] == corner_2x2[None, None, :, None, :, None]
  return (jnp.where(chosen, g[:, :, None, :, None, :], 0).reshape(b, 2 * h, 2 * w, c),)


_reshape_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


def used_input_size(size: int, num_convs: int, pool_after, kernel_sizes=()) -> int:
  """How many leading input rows (or columns) can reach the output at all.

  VALID pooling drops an odd last row; every input row that fed only that row is dead work. For
  28x28 MNIST: 28 -> conv 26 -> pool 13 -> conv 11 -> conv 9 -> pool 4 uses just 26 input rows,
  so the convolutions compute 24, 10 and 8 rows instead of 26, 11 and 9 (~20% fewer FLOPs) and
  the outputs are exactly the same. `kernel_sizes`: one per conv layer (() = all 3).
  """
  kernel_sizes = tuple(kernel_sizes) or (3,) * num_convs
  for i in range(num_convs):
    size = size - kernel_sizes[i] + 1
    if i in pool_after:
      size //= 2
  for i in reversed(range(num_convs)):
    if i in pool_after:
      size *= 2
    size += kernel_sizes[i] - 1
  return size


class Dropout(nn.Dropout):
  """flax's Dropout, whose rate may also come at call time as an array (the per-member rates of
  a vmapped group). Its name, key and arithmetic are nn.Dropout's, so a Python rate gives
  exactly what nn.Dropout gives; an array rate of 0 keeps every input unchanged."""

  @nn.compact
  def __call__(self, inputs, deterministic: bool = False, rate=None):
    rate = self.rate if rate is None else rate
    static = isinstance(rate, (int, float))
    if deterministic or (static and rate == 0.0):
      return inputs
    keep_prob = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), p=keep_prob, shape=inputs.shape)
    # An array rate is float32: the scaled inputs keep their own dtype (bfloat16 stays so).
    return lax.select(mask, (inputs / keep_prob).astype(inputs.dtype), jnp.zeros_like(inputs))


# The conv kernels' initializers. PyTorch's Conv2d default, kaiming_uniform with a = sqrt(5),
# is uniform in +-1/sqrt(fan_in): variance 1/(3 fan_in), a sixth of he_uniform's 2/fan_in.
TORCH_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
CONV_INITS = {'he_uniform': nn.initializers.he_uniform(), 'torch': TORCH_INIT}


class CNN(nn.Module):
  """The tutorial's Keras Sequential CNN."""
  conv_features: Sequence[int] = (32, 64, 64)
  kernel_sizes: Sequence[int] = ()       # square kernel size of each conv layer (() = all 3)
  pool_after: Sequence[int] = (0, 2)      # indices of the conv layers followed by 2x2 max pooling
  dense_features: int = 100
  num_classes: int = 10
  conv_impl: str = 'lax'                 # 'lax' (XLA convolution), 'im2col', 'winograd', 'mixed'
  #                                        (lax for single-channel inputs, im2col for the others),
  #                                        or one of the first three per layer: 'lax,winograd,...'
  pool_impl: str = 'lax'                 # 'lax' (nn.max_pool) or 'reshape'
  skip_dead_rows: bool = True            # crop input rows no output depends on (same outputs;
  #                                        not with batch_norm, whose statistics see them)
  dropout_rate: float = 0.0              # dropout before each dense layer when training
  batch_norm: bool = False               # BatchNorm after each conv and the hidden dense layer
  dtype: Any = jnp.float32               # activations and products (bfloat16: mixed precision);
  #                                        parameters are float32, logits returned as float32
  conv_init: str = 'he_uniform'          # the conv kernels' initializer: Keras's he_uniform
  #                                        (the tutorial's) or 'torch' (PyTorch's Conv2d default)
  dense_init: str = 'keras'              # the dense layers': 'keras' (the tutorial's he_uniform
  #                                        and glorot_uniform) or 'torch' (PyTorch's Linear)
  input_norm: Sequence[float] = (0.0, 1.0)  # (mean, std): the [0, 1] pixels become
  #                                        (x - mean) / std first ((0, 1): used as they are)

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False, dropout_rate=None):
    """Logits; `dropout_rate` (default: the module's) may be an array: a vmapped member's."""
    rate = self.dropout_rate if dropout_rate is None else dropout_rate
    x = x_BxHxWxC
    if tuple(self.input_norm) != (0.0, 1.0):  # in float32, as export's ONNX graph does
      mean, std = self.input_norm
      x = (x.astype(jnp.float32) - mean) * (1.0 / std)
    x = x.astype(self.dtype)
    # Batch statistics are means over every output row, dead ones included: no cropping then.
    if self.skip_dead_rows and not self.batch_norm:
      h, w = (used_input_size(n, len(self.conv_features), self.pool_after, self.kernel_sizes)
              for n in x.shape[1:3])
      x = x[:, :h, :w, :]
    impls = conv_impls(self.conv_impl, len(self.conv_features))
    kernel_sizes = tuple(self.kernel_sizes) or (3,) * len(self.conv_features)
    conv_init = CONV_INITS[self.conv_init]
    for i, features in enumerate(self.conv_features):
      impl = impls[i] if impls[i] != 'mixed' else 'lax' if x.shape[-1] == 1 else 'im2col'
      conv_fn = {'lax': None, 'im2col': im2col_conv, 'winograd': winograd_conv}[impl]
      k = (kernel_sizes[i],) * 2
      if impl == 'im2col' and self.dtype == jnp.bfloat16:
        x = Bf16Conv(features, k, use_bias=not self.batch_norm, kernel_init=conv_init,
                     name=f'conv{i + 1}')(x)
      else:
        x = nn.Conv(features, k, padding='VALID', kernel_init=conv_init,
                    use_bias=not self.batch_norm, conv_general_dilated=conv_fn,
                    dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = nn.relu(self._normalized(x, train, f'bn{i + 1}'))
      if i in self.pool_after:
        x = max_pool_2x2(x, self.pool_impl)
    x = x.reshape(x.shape[0], -1)
    x = Dropout(self.dropout_rate)(x, deterministic=not train, rate=rate)
    dot_general = dot_general_f32_sums if self.dtype == jnp.bfloat16 else None
    torch_dense = self.dense_init == 'torch'
    x = nn.Dense(self.dense_features,
                 kernel_init=TORCH_INIT if torch_dense else nn.initializers.he_uniform(),
                 use_bias=not self.batch_norm, dtype=self.dtype, dot_general=dot_general,
                 name='dense1')(x)
    x = nn.relu(self._normalized(x, train, f'bn{len(self.conv_features) + 1}'))
    x = Dropout(self.dropout_rate)(x, deterministic=not train, rate=rate)
    # The tutorial's output layer keeps Keras's default glorot_uniform initializer.
    logits = nn.Dense(self.num_classes,
                      kernel_init=TORCH_INIT if torch_dense else nn.initializers.glorot_uniform(),
                      dtype=self.dtype, dot_general=dot_general, name='dense2')(x)
    return logits.astype(jnp.float32)  # softmax and loss in float32, whatever the dtype

  def _normalized(self, x, train: bool, name: str):
    """BatchNorm with Keras's defaults (momentum 0.99, epsilon 1e-3) when `batch_norm`; its
    offset stands in for the bias the layer before it then goes without. Training normalizes
    by the batch's statistics (over all devices: the batch is one sharded array) and updates
    the running ones in the 'batch_stats' collection, which evaluation uses."""
    if not self.batch_norm:
      return x
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                        dtype=self.dtype, name=name)(x)


def build_model(model_config, conv_impl: str = 'lax', pool_impl: str = 'lax') -> CNN:
  """The model from config.model and the formulations to run (configlib.resolve picks them for
  'auto'): plain arguments in, so the module never sees a ConfigDict. The parameters are the
  same whichever formulation runs."""
  return CNN(conv_features=tuple(model_config.conv_features),
             kernel_sizes=tuple(model_config.kernel_sizes),
             pool_after=tuple(model_config.pool_after),
             dense_features=model_config.dense_features,
             dropout_rate=model_config.dropout_rate,
             batch_norm=model_config.batch_norm,
             dtype=jnp.dtype(model_config.dtype), conv_init=model_config.conv_init,
             dense_init=model_config.dense_init,
             input_norm=tuple(model_config.input_norm),
             conv_impl=conv_impl, pool_impl=pool_impl)


def count_params(params) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def summary_table(model: CNN, image_shape=(28, 28, 1)) -> str:
  """A Keras-style summary: layer, output shape, parameter count; computed from shapes only."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  rows = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == '__call__' and mod.name is not None and mod is not model:
      n = count_params(mod.variables.get('params', {})) if mod.variables else 0
      rows.append((mod.name, type(mod).__name__, (None,) + tuple(out.shape[1:]), n))
    return out

  def init(rng, x):
    with nn.intercept_methods(interceptor):  # the shapes of the layers as Keras defines them
      return model.clone(skip_dead_rows=False).init(rng, x)

  variables = jax.eval_shape(init, jax.random.key(0), x)
  total = count_params(variables['params'])
  lines = [f"{'Layer (type)':<22}{'Output Shape':<22}{'Param #':>10}", '=' * 54]
  for name, kind, shape, n in rows:
    lines.append(f"{f'{name} ({kind})':<22}{str(shape):<22}{n:>10,}")
  lines += ['=' * 54, f'Total params: {total:,}']
  return '\n'.join(lines)
