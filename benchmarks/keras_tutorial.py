"""The Keras tutorial's job, for timing against digitjax on the same machine.

Same recipe as the well-known Keras MNIST CNN tutorial: pixels scaled to [0,1], 10% of the
training set held out (validation_split=0.1), Conv32-MaxPool-Conv64-Conv64-MaxPool-Dense100-Dense10
with he_uniform, SGD(0.01, momentum=0.9), batch 32; then test evaluation and a saved model.
MNIST comes from the local IDX files (keras.datasets would download).

  python benchmarks/keras_tutorial.py --data ../shared/data/mnist --epochs 1 --out /tmp/keras_job
  python benchmarks/keras_tutorial.py ... --policy mixed_bfloat16   # Keras's mixed precision

Prints one JSON line with the timings. With a mixed policy (Keras's own mixed precision guide:
computations in bfloat16, variables float32), the output layer's softmax runs in float32, as
the guide recommends: Dense(10) then Activation('softmax', dtype='float32').
"""
import argparse
import gzip
import json
import os
import time

START = time.time()


def load_idx(path):
  import numpy as np
  raw = gzip.open(path).read()
  ndim = raw[3]
  dims = np.frombuffer(raw[4:4 + 4 * ndim], '>u4')
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--data', default='../shared/data/mnist')
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--out', default='/tmp/keras_tutorial')
  parser.add_argument('--policy', default='float32',
                      help="Keras dtype policy: 'float32' (the tutorial) or 'mixed_bfloat16'")
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import numpy as np
  from tensorflow import keras
  keras.mixed_precision.set_global_policy(args.policy)
  mixed = args.policy != 'float32'

  x_train = load_idx(f'{args.data}/train-images-idx3-ubyte.gz').reshape(-1, 28, 28, 1)
  y_train = load_idx(f'{args.data}/train-labels-idx1-ubyte.gz')
  x_test = load_idx(f'{args.data}/t10k-images-idx3-ubyte.gz').reshape(-1, 28, 28, 1)
  y_test = load_idx(f'{args.data}/t10k-labels-idx1-ubyte.gz')
  x_train, x_test = x_train.astype('float32') / 255.0, x_test.astype('float32') / 255.0
  y_train, y_test = keras.utils.to_categorical(y_train), keras.utils.to_categorical(y_test)

  model = keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(32, (3, 3), activation='relu', kernel_initializer='he_uniform'),
      keras.layers.MaxPooling2D((2, 2)),
      keras.layers.Conv2D(64, (3, 3), activation='relu', kernel_initializer='he_uniform'),
      keras.layers.Conv2D(64, (3, 3), activation='relu', kernel_initializer='he_uniform'),
      keras.layers.MaxPooling2D((2, 2)),
      keras.layers.Flatten(),
      keras.layers.Dense(100, activation='relu', kernel_initializer='he_uniform'),
      *([keras.layers.Dense(10), keras.layers.Activation('softmax', dtype='float32')] if mixed
        else [keras.layers.Dense(10, activation='softmax')]),
  ])
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
                loss='categorical_crossentropy', metrics=['accuracy'])

  class Timing(keras.callbacks.Callback):
    """Wall time of the training steps of each epoch (validation excluded), first step apart."""
    def on_epoch_begin(self, epoch, logs=None):
      self.epoch_start = time.perf_counter()
    def on_train_batch_end(self, batch, logs=None):
      now = time.perf_counter()
      if batch == 0:
        self.first_step, self.first_end, self.first_step_unix = now - self.epoch_start, now, time.time()
      self.last_end, self.batches = now, batch + 1

  timing = Timing()
  before_fit = time.time()
  history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=32, validation_split=0.1,
                      verbose=0, callbacks=[timing])
  _, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
  os.makedirs(args.out, exist_ok=True)
  model.save(os.path.join(args.out, 'final_model.keras'))
  print(json.dumps({
      'framework': 'keras', 'keras_version': keras.__version__, 'policy': args.policy,
      'train_seconds': timing.last_end - timing.epoch_start,
      'steady_step_ms': 1000 * (timing.last_end - timing.first_end) / (timing.batches - 1),
      'first_step_seconds': timing.first_step,
      'start_to_first_step_seconds': timing.first_step_unix - START,
      'start_to_fit_seconds': before_fit - START,
      'steps': timing.batches,
      'test_accuracy': float(test_accuracy),
      'val_accuracy': float(history.history['val_accuracy'][-1]),
      'job_seconds': time.time() - START,
  }))


if __name__ == '__main__':
  main()
