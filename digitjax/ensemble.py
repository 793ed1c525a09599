"""Seed ensembles: K models trained side by side by `jax.vmap`, in one compiled program.

Member i is the model that a single run with `seed=config.seed + i` and
`data.split_seed=config.seed` trains: its own initial parameters, PRNG key (dropout,
augmentation) and example order, on the validation holdout that all members share. Its steps
match that run's to float32 rounding (vmap's batched matrix products round differently), which
training amplifies over hundreds of steps as it does any rounding difference. Their train
states are stacked along a leading axis of size K, and the unchanged train step is vmapped over
it, so K models cost one program and one dispatch per chunk instead of K runs. The ensemble
predicts the mean of its members' softmax probabilities.

`ensemble_size=1` is a single model, never stacked: each helper here then returns exactly what
the single-model code always used.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from digitjax import data, metrics as metrics_lib


def member_seeds(config) -> list[int]:
  """Seeds of the members' initialization, PRNG keys and example orders."""
  return [config.seed + i for i in range(config.ensemble_size)]


def stack(trees: list):
  """Pytrees of one structure -> one pytree whose arrays gain a leading member axis."""
  leaves = [jax.tree.leaves(tree) for tree in trees]
  return jax.tree.unflatten(jax.tree.structure(trees[0]),
                            [jnp.stack(member_leaves) for member_leaves in zip(*leaves)])


def member(tree, i: int):
  """Member i of a stacked pytree."""
  return jax.tree.map(lambda x: x[i], tree)


def init_state(create_state, config):
  """`create_state(key)` of the model's seed, or vmapped over the members' seeds: stacked.

  One vmapped init compiles once for all members (K separate ones took K times as long), and
  gives each member the parameters and key a single run of its seed starts from, bit for bit
  (checked with configs/default.py on this CPU: the initializers are elementwise).
  """
  if config.ensemble_size == 1:
    return create_state(jax.random.key(config.seed))
  return jax.vmap(create_state)(jnp.stack([jax.random.key(s) for s in member_seeds(config)]))


def epoch_permutation(config, epoch: int, n: int) -> jax.Array:
  """The epoch's example order: (n,) for one model; (K, n), each member's own, for an ensemble."""
  perms = [data.epoch_permutation(seed, epoch, n) for seed in member_seeds(config)]
  return perms[0] if config.ensemble_size == 1 else jnp.stack(perms)


def combine_logits(logits: np.ndarray) -> np.ndarray:
  """An ensemble's (K, N, C) member logits -> (N, C) log of the mean softmax probability.

  The log keeps the result usable wherever logits are: softmax gives the mean probabilities
  back and argmax the ensemble's prediction. A single model's (N, C) logits pass unchanged.
  """
  if logits.ndim == 2:
    return logits
  if logits.size == 0:  # an empty split: nothing to average
    return logits[0]
  log_probs = metrics_lib.log_softmax64(logits)
  top = log_probs.max(0)  # log(mean(exp)) taken about the largest, so nothing underflows
  return top + np.log(np.exp(log_probs - top).mean(0))


def member_summary(split: str, metrics: dict) -> dict:
  """member_<split>_accuracy and _loss (one entry per member) and the accuracy's mean and sample
  standard deviation over members, the multi-seed statistics; {} for a single model."""
  if 'members' not in metrics:
    return {}
  accuracy = [m['accuracy'] for m in metrics['members']]
  return {f'member_{split}_accuracy': accuracy,
          f'member_{split}_accuracy_mean': float(np.mean(accuracy)),
          f'member_{split}_accuracy_std': float(np.std(accuracy, ddof=1)),
          f'member_{split}_loss': [m['loss'] for m in metrics['members']]}


def describe(split: str, summary: dict) -> str:
  """' - member_val_accuracy: 0.9812 0.9790 (mean 0.9801, std 0.0016)'; '' for a single model."""
  accuracy = summary.get(f'member_{split}_accuracy')
  if accuracy is None:
    return ''
  return (f' - member_{split}_accuracy: {" ".join(f"{a:.4f}" for a in accuracy)} '
          f'(mean {summary[f"member_{split}_accuracy_mean"]:.4f}, '
          f'std {summary[f"member_{split}_accuracy_std"]:.4f})')
