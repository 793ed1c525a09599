"""Trained models out of JAX: a TensorFlow SavedModel and an ONNX model of the same function.

Both files compute one function, of a single model or of several (the mean of their softmax
probabilities: a population's selection; members of any architecture `model.CNN` builds,
BatchNorm ones included):

  input   'images'         uint8, shape (N, 28, 28): pixels 0-255 in MNIST form, light ink on
                           black, as the dataset's files hold them and `images.to_mnist` makes
                           them; any N, 0 included
  output  'probabilities'  float32, shape (N, num_classes): each row sums to 1

Both compute in float32 from the float32 parameters, whatever `model.dtype` the run trained
with: a bfloat16 run (activations and products rounded to bfloat16 in training and in
digitjax's own evaluation) exports the same weights as a float32 function, since ONNX runtimes
have no bfloat16 convolution on CPU; its exports then differ from its bfloat16 evaluation by
bfloat16's rounding, and from each other by float32's only.

The model sees `images / 255`, as in training. One input type keeps the two files alike: a
caller with float images in [0, 1] sends `np.round(x * 255).astype(np.uint8)`, and one with
(N, 28, 28, 1) arrays drops the last axis.

`members` is a list of (module, variables) pairs: the module from
`model.build_model(config.model)` (any formulation: they share the parameters; inference is
`train=False`, where dropout passes its input through), the variables {'params': ...} plus
'batch_stats' for a BatchNorm model, as numpy or JAX arrays. Nothing here reads a config or a
checkpoint: `modes.run_export` does, and writes the files under the names workdir.py gives.

- SavedModel: jax2tf lowers the JAX function itself to StableHLO, kept in the SavedModel as
  one XlaCallModule op with the weights as constants. Plain TensorFlow loads and runs it (no
  JAX needed); TensorFlow must be recent enough for that op's version (TF 2.21 runs what
  jax 0.10.2 writes). The module is lowered for `platforms`: 'cpu' and 'cuda' by default (only
  CPU has been run here).
  tf2onnx cannot convert this SavedModel (it has no XlaCallModule converter).
- ONNX: built node by node from the variables with the `onnx` package (opset 17, NCHW):
  Cast, Div, Unsqueeze, then per convolution Conv [BatchNormalization] Relu [MaxPool], then
  Gemm [BatchNormalization] Relu Gemm Softmax, and Mean over the members. The convolutions
  run on the whole 28x28 image: the rows `CNN.skip_dead_rows` crops reach no output, so the
  outputs are the same. The first dense layer's kernel rows are reordered from JAX's (h, w, c)
  flattening to ONNX's (c, h, w). Dropout, an identity at inference, has no node.

The folder holding both is replaced whole (modes.py, with workdir.written_aside): the new files
are written into a sibling `<folder>.<pid>.tmp`, which takes the folder's place in one exchange
of names, so the folder always holds one complete export, never files of two; a kill -9 leaves
only that sibling, which the next export removes (`clean_leftovers`).

TensorFlow and onnx are imported by the functions that write each file, never by this module's
import: the other modes do not load them.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = (28, 28)
INPUT_NAME = 'images'
OUTPUT_NAME = 'probabilities'
ONNX_OPSET = 17
BATCH_NORM_EPSILON = 1e-3  # model.CNN._normalized's (Keras's default)

Member = tuple[Any, dict]  # (flax module, variables)
# The packages each file needs, by import name -> the name pip installs.
PACKAGES = {'tensorflow': 'tensorflow', 'onnx': 'onnx'}


def missing_packages() -> list[str]:
  """The pip names of the packages export needs that are not installed (nothing imported)."""
  return [pip for name, pip in PACKAGES.items() if importlib.util.find_spec(name) is None]


def probabilities_fn(members: Sequence[Member]) -> Callable:
  """uint8 (N, 28, 28) images -> float32 (N, C): the mean of the members' softmax probabilities
  (a single member's own), computed in float32 whatever the modules' dtype. The function both
  files export, and their reference."""
  members = list(members)
  if not members:
    raise ValueError('export needs at least one model')

  members = [(module.clone(dtype=jnp.float32), variables) for module, variables in members]

  def probabilities(images_NxHxW):
    x = images_NxHxW.astype(jnp.float32)[..., None] / 255.0
    probs = [jax.nn.softmax(module.apply(variables, x, train=False), axis=-1)
             for module, variables in members]
    return probs[0] if len(probs) == 1 else jnp.mean(jnp.stack(probs), axis=0)

  return probabilities


# ---------------------------------------------------------------------------------------------
# The folder: both files replaced together

# What an export writes or moves aside, beside the folder: `<folder>.<pid>.tmp|old`.
_ASIDE = re.compile(r'(?P<base>.+)\.(?P<pid>[0-9]+)\.(?P<kind>tmp|old)')


def clean_leftovers(folder: str) -> list[str]:
  """Removes what exports that were killed (whose pid no process has) left beside `folder`: a
  new export half written (`<folder>.<pid>.tmp`), or an old one replaced (`.old`), which is put
  back instead when `folder` is missing. Returns one line for each thing done."""
  parent, base = os.path.split(os.path.abspath(folder))
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return []
  found = [m for m in map(_ASIDE.fullmatch, entries)
           if m and m['base'] == base and not _alive(int(m['pid']))]
  done = []
  for m in sorted(found, key=lambda m: m['kind'] != 'old'):  # a folder to put back first
    path = os.path.join(parent, m.string)
    if m['kind'] == 'old' and not os.path.lexists(folder):
      os.rename(path, folder)
      done.append(f'put back {folder} from {path}, where an export killed while replacing it '
                  f'(pid {m["pid"]}) had moved it')
    else:
      _remove(path)
      done.append(f'removed {path}, left by an export that was killed (pid {m["pid"]})')
  return done


def _alive(pid: int) -> bool:
  if pid == os.getpid():  # this process's leftovers are its own to replace
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.unlink(path)


# ---------------------------------------------------------------------------------------------
# TensorFlow SavedModel


def export_savedmodel(members: Sequence[Member], path: str,
                      platforms: Sequence[str] = ('cpu', 'cuda')) -> str:
  """Writes the SavedModel directory `path`; returns it.

  Load: `m = tf.saved_model.load(path)`, then `m.serve(images)['probabilities']` or
  `m.signatures['serving_default'](images=images)['probabilities']`.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf
  try:  # TensorFlow only traces and saves here: any GPU stays JAX's
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow was initialized before (tfds): it is as it is
    pass

  members = list(members)
  if not members:
    raise ValueError('export needs at least one model')
  h, w = IMAGE_SIZE
  converted = jax2tf.convert(probabilities_fn(members), polymorphic_shapes=[f'(n, {h}, {w})'],
                             with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  spec = tf.TensorSpec([None, h, w], tf.uint8, name=INPUT_NAME)

  num_classes = _num_classes(members)

  def serve(images):
    # The lowered function takes n >= 1 images (JAX's symbolic dimensions are positive).
    probabilities = tf.cond(tf.shape(images)[0] > 0, lambda: converted(images),
                            lambda: tf.zeros([0, num_classes], tf.float32))
    return {OUTPUT_NAME: probabilities}

  module = tf.Module()
  module.serve = tf.function(serve, input_signature=[spec], autograph=False)
  try:
    tf.saved_model.save(module, path,
                        signatures={'serving_default': module.serve.get_concrete_function()})
  except tf.errors.OpError as e:  # TensorFlow's own file errors: an OSError like any other
    reason = (e.message.strip().splitlines() or [''])[0].replace(f'{path}; ', '')
    raise OSError(errno.EIO, reason[:200], path) from e
  return path


# ---------------------------------------------------------------------------------------------
# ONNX


def export_onnx(members: Sequence[Member], path: str) -> str:
  """Writes the ONNX model file `path` (one graph, whatever the number of members); returns it.

  Run: `s = onnxruntime.InferenceSession(path)`, then
  `s.run(['probabilities'], {'images': images})[0]`.
  """
  import onnx
  members = list(members)
  if not members:
    raise ValueError('export needs at least one model')
  graph = _OnnxGraph()
  h, w = IMAGE_SIZE
  graph.node('Cast', [INPUT_NAME], 'pixels', to=onnx.TensorProto.FLOAT)
  graph.node('Div', ['pixels', graph.const('255', np.float32(255.0))], 'scaled')
  graph.node('Unsqueeze', ['scaled', graph.const('channel_axis', np.array([1], np.int64))],
             'x')  # (N, 1, H, W)
  outputs = [_member_nodes(graph, module, variables, f'm{k}', 'x', (h, w))
             for k, (module, variables) in enumerate(members)]
  if len(outputs) == 1:
    graph.node('Identity', outputs, OUTPUT_NAME)
  else:
    graph.node('Mean', outputs, OUTPUT_NAME)

  num_classes = _num_classes(members)
  model = onnx.helper.make_model(
      onnx.helper.make_graph(
          graph.nodes, 'digitjax',
          [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.UINT8, ['N', h, w])],
          [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT,
                                              ['N', num_classes])],
          initializer=graph.initializers),
      opset_imports=[onnx.helper.make_opsetid('', ONNX_OPSET)], producer_name='digitjax')
  model.ir_version = min(model.ir_version, 8)  # what opset 17's runtimes read
  onnx.checker.check_model(model, full_check=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  onnx.save(model, path)
  return path


def _num_classes(members: Sequence[Member]) -> int:
  counts = {module.num_classes for module, _ in members}
  if len(counts) != 1:
    raise ValueError(f'the members predict different numbers of classes: {sorted(counts)}')
  return counts.pop()


class _OnnxGraph:
  """Nodes and initializers collected in order."""

  def __init__(self):
    self.nodes, self.initializers = [], []

  def const(self, name: str, value: np.ndarray) -> str:
    import onnx.numpy_helper
    self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
    import onnx
    self.nodes.append(onnx.helper.make_node(op, inputs, [output], name=output, **attributes))
    return output


class _Variables:
  """A member's variables as its graph takes them, each use recorded: a variable the graph
  leaves out is an error (the export does not know that architecture)."""

  def __init__(self, variables: dict, prefix: str):
    self.prefix = prefix
    self.collections = {name: _numpy_tree(variables.get(name, {}))
                        for name in ('params', 'batch_stats')}
    unknown = set(variables) - set(self.collections)
    if unknown:
      raise ValueError(f'{prefix}: unexpected variable collections {sorted(unknown)}')
    self.used = set()

  def take(self, collection, *keys):
    self.used.add((collection,) + keys)
    value = self.collections[collection]
    for key in keys:
      if key not in value:
        raise ValueError(f'{self.prefix}: no {collection}/{"/".join(keys)} in the variables; '
                         f'is the module a digitjax.model.CNN whose variables these are?')
      value = value[key]
    return value

  def check_all_used(self) -> None:
    unused = ['/'.join(path) for path in _leaf_paths(self.collections) if path not in self.used]
    if unused:
      raise ValueError(f'{self.prefix}: variables the ONNX graph does not use: {unused}; the '
                       f'export does not know this architecture')


def _member_nodes(graph: _OnnxGraph, module, variables: dict, prefix: str, x: str,
                  size: tuple[int, int]) -> str:
  """One `model.CNN`'s forward pass (inference) on NCHW `x`; returns its probabilities' name."""
  v = _Variables(variables, prefix)
  if tuple(module.input_norm) != (0.0, 1.0):  # model.input_norm: (x - mean) * (1 / std)
    mean, std = module.input_norm
    x = graph.node('Sub', [x, graph.const(f'{prefix}.input_mean', np.float32(mean))],
                   f'{prefix}.centred')
    x = graph.node('Mul', [x, graph.const(f'{prefix}.input_scale', np.float32(1.0 / std))],
                   f'{prefix}.standardized')
  x, size = _conv_nodes(graph, module, v, x, size)
  logits = _dense_nodes(graph, module, v, x, size)
  v.check_all_used()
  return graph.node('Softmax', [logits], f'{prefix}.probabilities', axis=-1)


def _normalized(graph: _OnnxGraph, module, v: _Variables, y: str, name: str) -> str:
  if not module.batch_norm:
    return y
  prefix, take = v.prefix, v.take
  return graph.node('BatchNormalization', [
      y, graph.const(f'{prefix}.{name}.scale', take('params', name, 'scale')),
      graph.const(f'{prefix}.{name}.bias', take('params', name, 'bias')),
      graph.const(f'{prefix}.{name}.mean', take('batch_stats', name, 'mean')),
      graph.const(f'{prefix}.{name}.var', take('batch_stats', name, 'var'))],
      f'{prefix}.{name}', epsilon=BATCH_NORM_EPSILON)


def _conv_nodes(graph: _OnnxGraph, module, v: _Variables, x: str,
                size: tuple[int, int]) -> tuple[str, tuple[int, int]]:
  """The convolutions (and their normalizations and pools): the output's name and (h, w)."""
  prefix, (h, w) = v.prefix, size
  for i in range(len(module.conv_features)):
    name = f'conv{i + 1}'
    kernel_HWIO = v.take('params', name, 'kernel')
    inputs = [x, graph.const(f'{prefix}.{name}.kernel', kernel_HWIO.transpose(3, 2, 0, 1))]
    if not module.batch_norm:
      inputs.append(graph.const(f'{prefix}.{name}.bias', v.take('params', name, 'bias')))
    y = graph.node('Conv', inputs, f'{prefix}.{name}', kernel_shape=list(kernel_HWIO.shape[:2]),
                   pads=[0, 0, 0, 0], strides=[1, 1])
    x = graph.node('Relu', [_normalized(graph, module, v, y, f'bn{i + 1}')],
                   f'{prefix}.relu{i + 1}')
    h, w = h - kernel_HWIO.shape[0] + 1, w - kernel_HWIO.shape[1] + 1
    if i in module.pool_after:  # VALID: an odd last row or column is dropped, as in JAX
      x = graph.node('MaxPool', [x], f'{prefix}.pool{i + 1}', kernel_shape=[2, 2],
                     strides=[2, 2])
      h, w = h // 2, w // 2
  return x, (h, w)


def _dense_nodes(graph: _OnnxGraph, module, v: _Variables, x: str,
                 size: tuple[int, int]) -> str:
  """The dense layers on the convolutions' output `x` of `size`: the logits' name."""
  prefix, take, (h, w) = v.prefix, v.take, size
  flat = graph.node('Flatten', [x], f'{prefix}.flatten', axis=1)  # (c, h, w) order
  dense1 = take('params', 'dense1', 'kernel')
  c = module.conv_features[-1]
  if dense1.shape[0] != h * w * c:
    raise ValueError(f'{prefix}: dense1 takes {dense1.shape[0]} features; the convolutions '
                     f'give {h}x{w}x{c}')
  dense1_CHWxF = dense1.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
  inputs = [flat, graph.const(f'{prefix}.dense1.kernel', dense1_CHWxF)]
  if not module.batch_norm:
    inputs.append(graph.const(f'{prefix}.dense1.bias', take('params', 'dense1', 'bias')))
  y = graph.node('Gemm', inputs, f'{prefix}.dense1')
  y = graph.node('Relu', [_normalized(graph, module, v, y,
                                      f'bn{len(module.conv_features) + 1}')],
                 f'{prefix}.relu_dense1')
  return graph.node('Gemm', [y, graph.const(f'{prefix}.dense2.kernel',
                                            take('params', 'dense2', 'kernel')),
                             graph.const(f'{prefix}.dense2.bias',
                                         take('params', 'dense2', 'bias'))], f'{prefix}.logits')


def _numpy_tree(tree) -> dict:
  return jax.tree.map(lambda a: np.asarray(a, np.float32), dict(tree))


def _leaf_paths(tree: dict) -> list[tuple[str, ...]]:
  return [tuple(str(p.key) for p in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
