"""Speedrun: the least training time to >= 99.0% test accuracy for every seed, on this CPU.

A small CNN after tuomaso/train_mnist_fast (benchmarks/speedrun_torch.py trains that recipe in
PyTorch, the peer): Conv16(5x5)-MaxPool-Conv24(3x3)-MaxPool-Dense256-Dense10 (160,322
parameters), initialized as PyTorch does (conv and dense kernels), the pixels standardized with
MNIST's mean and std as the peer's are, Adam (betas 0.7, 0.9) with a one-cycle learning rate, on
all 60,000 training images (no validation holdout: the test split is the judge, as for the
peer). Changed from the peer's recipe, by 5-seed runs here (docs/performance.md "The speedrun"):
batch 64 instead of 256 (cheaper per image on this CPU), peak learning rate 0.005 instead of
0.01, 16 first-layer and 24 second-layer channels instead of 24 and 32 (fewer multiplications
per image), label smoothing 0.1, and 0.8 epochs instead of 1: seeds 0-4 0.9918, 0.9910, 0.9919,
0.9918, 0.9916. Label smoothing is the lever (at 1 epoch without it the minimum was 0.9900; with
it 0.9909); at 0.7 epochs the minimum was 0.9906, at 0.6 0.9897.
bfloat16 is slower for this model. The tutorial's model stays configs/default.py's.

  python launch.py --config=configs/speedrun.py --workdir=runs/speedrun --config.seed=S \
      --config.data.manual_dir=../shared/data/mnist

benchmarks/speedrun.py runs seeds 0-4 of it and of the peer in one invocation.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.validation_fraction = 0.0     # train on all 60,000; the test split judges
  config.model.conv_features = (16, 24)  # the peer's (24, 32) cost more per image
  config.model.kernel_sizes = (5, 3)
  config.model.pool_after = (0, 1)
  config.model.dense_features = 256
  config.model.conv_init = 'torch'     # PyTorch's initialization, as the peer's
  config.model.dense_init = 'torch'
  config.model.input_norm = (0.1307, 0.3081)  # the peer's standardization (MNIST's mean, std)
  config.batch_size = 64               # 938 steps per epoch
  config.num_epochs = 0.8              # 750 steps
  config.optimizer = 'adam'
  config.adam_b1, config.adam_b2 = 0.7, 0.9
  config.learning_rate = 0.005         # the one-cycle peak
  config.schedule = 'onecycle'         # 30% of the steps rising, then annealed to ~0
  config.label_smoothing = 0.1         # 0.8 epochs with it beat 1.0 without it
  config.log_every_steps = 0           # no TensorBoard points between epoch ends
  return config
