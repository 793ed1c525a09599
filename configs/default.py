"""The Keras tutorial's recipe, exactly: MNIST CNN, SGD 0.01 momentum 0.9, batch 32, 10 epochs.

Run (offline, with the IDX files in ../shared/data/mnist):

  python launch.py --config=configs/default.py --workdir=runs/default \
      --config.data.manual_dir=../shared/data/mnist

Measured on a 2-core x86 CPU (jax 0.10.2): see README.md "Results" for accuracy and time.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # Data
  config.dataset = 'mnist'             # tfds name: 'mnist' or 'fashion_mnist'
  config.validation_fraction = 0.1     # share of the training split held out for validation
  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ''            # where tfds keeps prepared datasets ('' = tfds's default)
  config.data.manual_dir = ''          # folder with the four IDX .gz files; '' = download via tfds
  config.data.verify_checksums = True  # check MNIST's decompressed SHA-256 pins when preparing
  config.data.max_train_examples = 0   # use only this many training examples (0 = all)
  config.data.cache_decoded = True     # keep tfds's decoded arrays beside the prepared dataset
  config.data.split_seed = -1          # seed of the validation holdout (-1 = seed)

  # Model: Conv-Pool-Conv-Conv-Pool-Dense-Dense, 159,254 parameters
  config.model = ml_collections.ConfigDict()
  config.model.conv_features = (32, 64, 64)  # output channels of the VALID convolutions
  config.model.kernel_sizes = ()             # square kernel size of each conv layer, e.g. (5, 3);
  #                                            () = 3x3 everywhere
  config.model.pool_after = (0, 2)           # conv layers (0-based) followed by 2x2 max pooling
  config.model.conv_init = 'he_uniform'      # conv kernels' initializer: 'he_uniform' (Keras's,
  #                                            the tutorial's) | 'torch' (PyTorch's Conv2d
  #                                            default: uniform in +-1/sqrt(fan_in))
  config.model.dense_init = 'keras'          # dense kernels' initializer: 'keras' (he_uniform,
  #                                            glorot_uniform for the output: the tutorial's) |
  #                                            'torch' (PyTorch's Linear: +-1/sqrt(fan_in))
  config.model.input_norm = (0.0, 1.0)       # (mean, std): the model standardizes its [0, 1]
  #                                            pixels as (x - mean) / std ((0, 1): unchanged)
  config.model.dense_features = 100          # width of the hidden dense layer
  config.model.dropout_rate = 0.0            # dropout before the dense layers (0 = none)
  config.model.batch_norm = False            # BatchNorm after each conv and dense1 (they lose
  #                                            their biases; running statistics for evaluation)
  config.model.conv_impl = 'auto'            # 'lax' | 'im2col' | 'winograd' | 'mixed' | 'auto'
  #                                            (on CPU im2col with the device input, mixed with
  #                                            tfds's; lax elsewhere; evaluation lax), or one
  #                                            per layer: 'lax,winograd,im2col'
  config.model.pool_impl = 'auto'            # 'lax' | 'reshape' | 'auto' (reshape on CPU)
  config.model.dtype = 'float32'             # computation: 'float32' | 'bfloat16' (activations
  #                                            and products in bfloat16; parameters, optimizer
  #                                            state, softmax and loss stay float32, so
  #                                            checkpoints restore under either)

  # Optimization
  config.batch_size = 32               # global batch, split across all devices
  config.num_epochs = 10.0             # passes over the training examples (may be fractional)
  config.optimizer = 'sgd'             # 'sgd' (with momentum) | 'adam' (optax.adam)
  config.learning_rate = 0.01          # learning rate (the schedule's peak)
  config.momentum = 0.9                # SGD momentum ('sgd' only)
  config.adam_b1 = 0.9                 # Adam's decay of the first moment ('adam' only)
  config.adam_b2 = 0.999               # Adam's decay of the second moment ('adam' only)
  config.seed = 0                      # one seed for init, validation split and example order
  config.schedule = 'constant'         # learning rate: 'constant' | 'cosine' | 'onecycle'
  config.warmup_epochs = 0.0           # linear warmup from 0 ('constant' and 'cosine')
  config.onecycle_pct_start = 0.3      # share of the steps spent rising ('onecycle')
  config.nesterov = False              # Nesterov momentum ('sgd' only)
  config.weight_decay = 0.0            # decayed weights added to the gradients (0 = none; with
  #                                      'adam' before its scaling: L2, not AdamW)
  config.ema_decay = 0.0               # weight averaging: the EMA of the weights (and BatchNorm
  #                                      statistics) with this decay, e.g. 0.999, warmed up as
  #                                      min(decay, (1+step)/(10+step)), is the delivered model
  #                                      (validation, test, eval, predict, export); 0 = none
  config.label_smoothing = 0.0         # training loss against labels smoothed by this, in
  #                                      [0, 1) (optax.smooth_labels; evaluation's loss is plain)
  config.plateau = ml_collections.ConfigDict()
  config.plateau.enabled = False       # Keras ReduceLROnPlateau-style rule on the epoch's loss
  config.plateau.factor = 0.5          # multiply the learning rate by this on a plateau
  config.plateau.patience = 3          # epochs without improvement before reducing
  config.plateau.cooldown = 0          # epochs to wait after a reduction

  # On-device augmentation (per image, keys from (seed, step)); in this order: stroke width,
  # elastic distortion, random affine. Each is on by its own field.
  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = False       # the random affine below (the tutorial trains on the
  #                                      images as they are)
  config.augment.rotation = 10.0       # degrees, uniform in [-rotation, rotation]
  config.augment.zoom = 0.1            # scale uniform in [1 - zoom, 1 + zoom]
  config.augment.shift = 0.1           # shift, fraction of the image size, per axis
  config.augment.elastic_alpha = 0.0   # elastic distortion (Simard et al. 2003): pixels a
  #                                      smoothed uniform field is scaled by (0 = off; they
  #                                      used 34)
  config.augment.elastic_sigma = 4.0   # the field's Gaussian smoothing, pixels, in (0, 28]
  config.augment.stroke = 0.0          # each image thickened (2x2 grey-scale dilation) with this
  #                                      probability and thinned (erosion) with it, in [0, 0.5]

  # Experiments: a population of members, each this config plus overrides (README "Experiments").
  # Without a sweep the run is a single model in the workdir itself.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.grid = ''               # 'field=v1,v2,...; field=v1,...': every combination, e.g.
  #                                      'learning_rate=0.003,0.01,0.03,0.1; seed=0,1,2' (12)
  config.sweep.members = ()            # override sets, each 'field=value; field=value' ('' = as
  #                                      is), e.g. ('', 'model.batch_norm=True'); with a grid,
  #                                      each set is combined with every grid point
  config.sweep.select = 'best'         # what the population delivers, chosen on validation:
  #                                      'best' member | 'ensemble' (mean probabilities of all)
  #                                      | 'top3' (of the 3 best; any k)
  config.sweep.execution = 'auto'      # members of a group: 'map' (one after another, each its
  #                                      own program) | 'vmap' (one program) | 'auto' (map on
  #                                      CPU, vmap on GPU/TPU)
  config.sweep.allow_large = False     # train a population even when its estimated memory (the
  #                                      largest group's states, every member's logits), disk
  #                                      (checkpoints) or open files exceed what this machine
  #                                      has; without it such a population is refused at once

  # A population that searches (README "Search"): 'pbt' or 'halving' train config.search.size
  # slots as one group, their numbers (the space) changed between compiled calls.
  config.search = ml_collections.ConfigDict()
  config.search.kind = 'grid'          # 'grid' (config.sweep as declared) | 'pbt' (population-
  #                                      based training) | 'halving' (successive halving, ASHA's
  #                                      rule, culled slots refilled with new proposals)
  config.search.space = ''             # the searched numbers, e.g. 'learning_rate=loguniform(
  #                                      1e-3,0.3); momentum=uniform(0.8,0.99)'
  config.search.size = 8               # slots trained at once (slot i starts with seed + i)
  config.search.ready_steps = 0        # pbt: steps between exploits; halving: the first rung
  config.search.metric = 'val_loss'    # fitness on validation: 'val_loss' | 'val_accuracy'
  config.search.sampler = 'tpe'        # optuna's sampler of new proposals: 'tpe' | 'random'
  config.search.quantile = 0.25        # pbt: the bottom fraction copies from the top fraction
  config.search.resample_probability = 0.25  # pbt: a number resampled from its prior, else
  config.search.perturb = (0.8, 1.2)   # ... multiplied by one of these (within its bounds)
  config.search.eta = 3                # halving: the best 1/eta of a rung go on
  config.search.schedule = ''          # a single run's numbers by step, as a pbt search writes
  #                                      them (found_config.py): '0: learning_rate=0.01; 1200:
  #                                      learning_rate=0.012'

  # Input and speed (these change how fast, not what is computed)
  config.input_pipeline = 'auto'       # 'device' (on device, lax.scan) | 'tfds' (per-step host batches) | 'auto' (= 'device')
  config.chunk_steps = 100             # steps per compiled scan call with the 'device' input
  config.grad_chunks = 0               # gradient summed over this many sub-batches, run in
  #                                      parallel; 0 = auto (2 on one CPU device, else 1)
  config.compilation_cache_dir = 'auto'  # JAX's persistent cache: 'auto' = $XDG_CACHE_HOME
  #                                        (default ~/.cache)/digitjax/jax; '' = off

  # Many hosts (see README "Running on many devices and hosts")
  config.distributed = ml_collections.ConfigDict()
  config.distributed.mode = 'auto'           # 'auto' (when a cluster is detected) | 'on' | 'off'
  config.distributed.coordinator_address = ''  # 'host:port' of process 0 ('' = from environment)
  config.distributed.num_processes = 0         # 0 = from the environment
  config.distributed.process_id = -1           # -1 = from the environment
  config.distributed.cpu_collectives = 'gloo'  # CPU collectives across processes
  config.distributed.initialization_timeout = 300  # seconds to wait for every process to join
  config.distributed.allow_several_cpu_devices = False  # in one process they hang (README)

  # Evaluation, logging, checkpoints
  config.eval_batch_size = 1000        # batch for validation/test (padded; multiple of devices)
  config.log_every_steps = 100         # TensorBoard: training loss, accuracy and learning rate
  #                                      every this many steps (0 = epoch ends only)
  config.checkpoint_keep = 3           # latest checkpoints kept (the best one is kept as well)
  config.plots = True                  # draw the pictures under workdir/plots at the end
  return config
