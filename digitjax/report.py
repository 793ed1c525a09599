"""Pictures of a run, as PNG files under workdir/plots.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing needs a display
and no global backend or figure registry is touched in the caller's process.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

PLOT_FILES = ('samples.png', 'class_counts.png', 'curves.png', 'confusion_matrix.png',
              'predictions.png', 'mistakes.png')
SPLIT_COLORS = {'train': '#4c72b0', 'val': '#dd8452', 'test': '#55a868'}
DPI = 100
SEARCH_CMAP = 'RdYlGn_r'  # draw_search's fitness colours: green the best (lowest), red the worst


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  # Written aside and renamed, so an interrupted report never leaves a truncated PNG behind.
  tmp = path + '.tmp'
  fig.savefig(tmp, format='png', facecolor='white')
  os.replace(tmp, path)
  return path


def _digit_grid(fig: Figure, images: np.ndarray, titles: list[str], colors: list[str],
                cols: int = 3) -> None:
  rows = max(1, -(-len(images) // cols))
  for i, (image, title, color) in enumerate(zip(images, titles, colors)):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.imshow(image.squeeze(), cmap='gray', vmin=0, vmax=255, interpolation='nearest')
    ax.set_title(title, color=color, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_samples(train: dict, path: str) -> str:
  """The tutorial's first figure: the first nine training images (MNIST's own order,
  data.first_images), with their labels."""
  fig = _figure(6, 6.4)
  n = min(9, len(train['label']))
  _digit_grid(fig, train['image'][:n], [f'Label: {l}' for l in train['label'][:n]], ['black'] * n)
  fig.suptitle('First training images', fontsize=13)
  return _save(fig, path)


def draw_class_counts(counts: dict[str, list[int]], path: str) -> str:
  """Examples per digit in each split, side by side: is any class rare?"""
  fig = _figure(9, 4.5)
  ax = fig.add_subplot()
  digits = np.arange(len(next(iter(counts.values()))))
  width = 0.8 / len(counts)
  for i, (name, values) in enumerate(counts.items()):
    ax.bar(digits + (i - (len(counts) - 1) / 2) * width, values, width,
           label=f'{name} ({sum(values):,})', color=SPLIT_COLORS.get(name))
  ax.set_xticks(digits)
  ax.set_xlabel('digit')
  ax.set_ylabel('examples')
  ax.set_title('Examples per digit')
  ax.set_ylim(0, 1.2 * max(1, *(max(v) for v in counts.values())))  # headroom for the legend
  ax.legend(title='split (total)', ncol=len(counts), loc='upper center')
  ax.grid(axis='y', alpha=0.3)
  return _save(fig, path)


def draw_curves(history: list[dict], path: str) -> str:
  """Train and validation loss and accuracy per epoch, side by side."""
  fig = _figure(11, 4.5)
  epochs = [r['epoch'] for r in history]
  for i, metric in enumerate(('loss', 'accuracy')):
    ax = fig.add_subplot(1, 2, i + 1)
    for prefix, label in (('train', 'train'), ('val', 'validation')):
      ax.plot(epochs, [r[f'{prefix}_{metric}'] for r in history], marker='o', label=label,
              color=SPLIT_COLORS[prefix])
    ax.set_xlabel('epoch')
    ax.set_ylabel(metric)
    ax.set_title(f'{metric.capitalize()} per epoch')
    ax.grid(alpha=0.3)
    if epochs:
      ax.legend()
      ax.set_xticks(epochs[::-(-len(epochs) // 12)])  # whole epochs, at most a dozen labels
    else:
      ax.set_xticks([])
      ax.set_yticks([])
      ax.text(0.5, 0.5, 'no epoch recorded yet', ha='center', va='center',
              transform=ax.transAxes)
  return _save(fig, path)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """matrix[true, predicted] = count."""
  return np.bincount(labels * num_classes + predictions,
                     minlength=num_classes ** 2).reshape(num_classes, num_classes)


def draw_confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                          path: str) -> str:
  matrix = confusion_matrix(labels, predictions, num_classes)
  fig = _figure(7.5, 6.5)
  ax = fig.add_subplot()
  # A power norm keeps the few mistakes visible beside a diagonal a hundred times larger.
  image = ax.imshow(matrix, cmap='Blues', norm=PowerNorm(0.3, vmin=0, vmax=max(matrix.max(), 1)))
  threshold = 0.5 * matrix.max()
  for t in range(num_classes):
    for p in range(num_classes):
      if matrix[t, p]:
        ax.text(p, t, str(matrix[t, p]), ha='center', va='center', fontsize=8,
                color='white' if matrix[t, p] > threshold else 'black')
  ax.set_xticks(range(num_classes))
  ax.set_yticks(range(num_classes))
  ax.set_xlabel('predicted digit')
  ax.set_ylabel('true digit')
  accuracy = np.trace(matrix) / max(matrix.sum(), 1)
  ax.set_title(f'Test confusion matrix ({matrix.sum():,} images, accuracy {accuracy:.2%})')
  fig.colorbar(image, ax=ax, label='images')
  return _save(fig, path)


def draw_predictions(test: dict, predictions: np.ndarray, path: str) -> str:
  """The tutorial's last figure: the first nine test images (MNIST's own order) titled with
  the model's prediction."""
  fig = _figure(6, 6.6)
  n = min(9, len(predictions))
  right = predictions[:n] == test['label'][:n]
  _digit_grid(fig, test['image'][:n], [f'Prediction: {p}' for p in predictions[:n]],
              ['black' if r else 'red' for r in right])
  fig.suptitle('First test images (red: wrong)', fontsize=13)
  return _save(fig, path)


def most_confident_mistakes(probabilities: np.ndarray, labels: np.ndarray,
                            count: int) -> np.ndarray:
  """Indices of up to `count` wrong predictions, the most confident first."""
  predictions = probabilities.argmax(-1)
  wrong = np.flatnonzero(predictions != labels)
  return wrong[np.argsort(-probabilities[wrong, predictions[wrong]], kind='stable')][:count]


def draw_mistakes(test: dict, probabilities: np.ndarray, path: str, count: int = 16) -> str:
  """The wrong test predictions the model was surest of: bad labels or real blind spots."""
  predictions = probabilities.argmax(-1)
  wrong = np.flatnonzero(predictions != test['label'])
  worst = most_confident_mistakes(probabilities, test['label'], count)
  cols = 4
  fig = _figure(7, max(3.0, 2.1 * -(-len(worst) // cols) + 0.6))
  titles = [f'true {test["label"][i]}, predicted {predictions[i]}\n'
            f'confidence {probabilities[i, predictions[i]]:.4f}' for i in worst]
  _digit_grid(fig, test['image'][worst], titles, ['black'] * len(worst), cols=cols)
  if not len(worst):
    ax = fig.add_subplot()
    ax.axis('off')
    ax.text(0.5, 0.5, f'No mistakes on the {len(predictions):,} test images', ha='center',
            va='center', fontsize=14)
  fig.suptitle(f'Most confident mistakes ({len(wrong):,} of {len(predictions):,} test images '
               f'wrong)', fontsize=12)
  return _save(fig, path)


def draw_all(plots: str, splits, test_logits: np.ndarray, history: list[dict]) -> list[str]:
  """All of a run's pictures in the folder `plots`; returns their paths. The samples are the
  images the tutorial shows first (splits.firsts, data.first_images); without them, the
  splits' first."""
  os.makedirs(plots, exist_ok=True)
  path = lambda name: os.path.join(plots, name)
  probabilities = np.asarray(jax.nn.softmax(test_logits.astype(np.float32), axis=-1))
  predictions = probabilities.argmax(-1)
  firsts = splits.firsts
  if firsts is None:
    firsts = {'train': splits.train,
              'test': {**splits.test, 'index': np.arange(min(9, len(predictions)))}}
  shown = firsts['test']['index']
  return [
      draw_samples(firsts['train'], path('samples.png')),
      draw_class_counts(splits.counts(), path('class_counts.png')),
      draw_curves(history, path('curves.png')),
      draw_confusion_matrix(splits.test['label'], predictions, probabilities.shape[-1],
                            path('confusion_matrix.png')),
      draw_predictions({k: v for k, v in firsts['test'].items() if k != 'index'},
                       predictions[shown], path('predictions.png')),
      draw_mistakes(splits.test, probabilities, path('mistakes.png')),
  ]


# ---------------------------------------------------------------------------------------------
# Populations


def draw_population(plots: str, results: dict, histories: list[list[dict]],
                    fields: list[str]) -> list[str]:
  """A population's members side by side: validation accuracy per epoch for every member, and
  final validation accuracy against each swept numeric field."""
  os.makedirs(plots, exist_ok=True)
  return [draw_member_curves(results['members'], histories,
                             os.path.join(plots, 'population_curves.png')),
          draw_fields(results['members'], fields, os.path.join(plots, 'population_fields.png'))]


def draw_member_curves(members: list[dict], histories: list[list[dict]], path: str) -> str:
  fig = _figure(10, 5.5)
  ax = fig.add_subplot()
  for m, history in zip(members, histories):
    points = [(r['epoch'], r['val_accuracy']) for r in history
              if isinstance(r.get('val_accuracy'), float) and np.isfinite(r['val_accuracy'])]
    if points:
      x, y = zip(*points)
      ax.plot(x, y, marker='o', markersize=3, linewidth=2.2 if m['selected'] else 1.2,
              label=m['name'] + (' (delivered)' if m['selected'] else ''))
  ax.set_xlabel('epoch')
  ax.set_ylabel('validation accuracy')
  ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
  ax.set_title(f'Validation accuracy per epoch, {len(members)} members')
  ax.grid(alpha=0.3)
  if len(members) <= 16 and ax.lines:
    ax.legend(fontsize=7, ncol=2 if len(members) > 8 else 1)
  return _save(fig, path)


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def draw_fields(members: list[dict], fields: list[str], path: str) -> str:
  """One panel per swept numeric field (seeds excepted): each other setting a line, its seeds
  drawn as the mean with the min-max spread; a log axis for learning rates (and any positive
  field spanning more than a factor of 10)."""
  scored = [m for m in members if m['val_accuracy'] is not None]
  numeric = [f for f in fields if f != 'seed' and
             _numeric([m['overrides'].get(f) for m in scored if f in m['overrides']])
             and any(f in m['overrides'] for m in scored)]
  panels = numeric or ['seed' if 'seed' in fields else None]
  fig = _figure(5.5 * len(panels), 4.5)
  for k, field in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    if field is None:
      ax.bar(range(len(scored)), [m['val_accuracy'] for m in scored])
      ax.set_xticks(range(len(scored)), [m['name'] for m in scored], rotation=60, ha='right',
                    fontsize=7)
    else:
      others = [f for f in fields if f not in (field, 'seed')]
      series: dict[str, dict] = {}
      for m in scored:
        label = ','.join(f'{f}={m["overrides"].get(f)}' for f in others) or 'all members'
        series.setdefault(label, {}).setdefault(m['overrides'].get(field), []).append(
            m['val_accuracy'])
      for label, points in series.items():
        xs = sorted(x for x in points if x is not None)
        mean = [float(np.mean(points[x])) for x in xs]
        low = [mean[i] - min(points[x]) for i, x in enumerate(xs)]
        high = [max(points[x]) - mean[i] for i, x in enumerate(xs)]
        ax.errorbar(xs, mean, yerr=[low, high], marker='o', capsize=4, label=label)
      values = [x for p in series.values() for x in p if x is not None]
      if values and min(values) > 0 and ('learning_rate' in field or
                                          max(values) / min(values) > 10):
        ax.set_xscale('log')
      ax.set_xlabel(field)
      if len(series) > 1 and len(series) <= 10:
        ax.legend(fontsize=7)
    ax.set_ylabel('final validation accuracy')
    ax.grid(alpha=0.3)
  seeds = sorted({m['overrides'].get('seed') for m in scored} - {None})
  fig.suptitle('Final validation accuracy by setting' +
               (f'\n(mean, and min-max over seeds {", ".join(map(str, seeds))})'
                if len(seeds) > 1 else ''), fontsize=11)
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Searches


def _search_timelines(lineage: list[dict]) -> tuple[list[str], dict[int, list[tuple]]]:
  """The searched fields (in order of appearance) and each slot's numbers over steps:
  slot -> [(step, params)], the last record of a step winning (an exploit's copy, then its
  explore)."""
  fields, slots = [], {}
  step_of = lambda r: r['step'] if _numeric([r.get('step')]) else 0
  for r in sorted(lineage, key=step_of):  # stable: file order within a step
    if r.get('event') not in ('start', 'exploit', 'explore', 'refill') or 'slot' not in r:
      continue
    params = r.get('new') or {}
    fields += [f for f in params if f not in fields]
    points = slots.setdefault(r['slot'], [])
    if points and points[-1][0] == step_of(r):
      points.pop()
    points.append((step_of(r), params))
  return fields, dict(sorted(slots.items()))


def _search_interval(lineage: list[dict]) -> int:
  """The usual distance between two search steps (the lines run on past the last one)."""
  steps = sorted({r['step'] for r in lineage if isinstance(r.get('step'), int)})
  gaps = np.diff(steps)
  return int(np.median(gaps)) if len(gaps) else 1


def _search_scores(lineage: list[dict], field: str) -> list[tuple]:
  """(step, value of field, fitness or None, marker) of every scored moment: an exploit's
  clone before the copy ('o') and its donor ('o'), a culled member ('x')."""
  points = []
  for r in lineage:
    step = r.get('step')
    if r.get('event') == 'exploit':
      points.append((step, (r.get('old') or {}).get(field), r.get('score'), 'o'))
      points.append((step, (r.get('new') or {}).get(field), r.get('parent_score'), 'o'))
    elif r.get('event') == 'cull':
      points.append((step, (r.get('old') or {}).get(field), r.get('score'), 'x'))
  return [p for p in points if _numeric([p[1]])]


def _search_copies(lineage: list[dict], field: str) -> list[tuple]:
  """(step, donor's value, clone's value after its explore) of every exploit."""
  explored = {(r.get('step'), r.get('slot')): r.get('new') or {} for r in lineage
              if r.get('event') == 'explore'}
  copies = []
  for r in lineage:
    if r.get('event') == 'exploit':
      donor = (r.get('new') or {}).get(field)
      clone = explored.get((r.get('step'), r.get('slot')), r.get('new') or {}).get(field)
      if _numeric([donor, clone]):
        copies.append((r['step'], donor, clone))
  return copies


def _draw_scored(ax, points: list[tuple], marker: str, norm, size: float) -> None:
  """Scored moments (step, value, fitness, marker) coloured by fitness, an x outlined so that
  the pale middle colours show on white; those without one (a diverged member) in black, a
  circle left hollow."""
  finite = lambda f: _numeric([f]) and np.isfinite(f)
  scored = [(s, v, f) for s, v, f, _ in points if finite(f) and norm is not None]
  diverged = [(s, v) for s, v, f, _ in points if not finite(f) or norm is None]
  circle = marker == 'o'
  if scored:
    s, v, f = zip(*scored)
    drawn = ax.scatter(s, v, c=f, cmap=SEARCH_CMAP, norm=norm, marker=marker,
                       s=size if circle else 1.8 * size, linewidths=0.5 if circle else 2,
                       edgecolors='0.2' if circle else None, zorder=4)
    if not circle:
      drawn.set_path_effects([patheffects.withStroke(linewidth=3.2, foreground='0.15')])
  if diverged:
    s, v = zip(*diverged)
    if circle:
      ax.scatter(s, v, marker=marker, s=size * 1.1, facecolors='none', edgecolors='black',
                 linewidths=1.2, zorder=4)
    else:
      ax.scatter(s, v, marker=marker, s=1.8 * size, c='black', linewidths=2, zorder=4)


def _draw_search_field(ax, field: str, lineage: list[dict], slots: dict, end: int,
                       norm) -> None:
  """One searched field's panel: each slot's value as a step line, copies as dashed arrows
  from the donor's value to the clone's, scored moments coloured by fitness, culls as x,
  refills as triangles."""
  palette = colormaps['tab20']
  colors = [palette(2 * i % 20 + i // 10 % 2) for i in range(len(slots))]  # dark shades first
  for color, (slot, points) in zip(colors, slots.items()):
    xs = [s for s, p in points if _numeric([p.get(field)])]
    ys = [p[field] for s, p in points if _numeric([p.get(field)])]
    if xs:
      ax.step(xs + [end], ys + ys[-1:], where='post', color=color, alpha=0.55, linewidth=1.2,
              label=f'slot {slot}')
  for step, donor, clone in _search_copies(lineage, field):
    ax.annotate('', xy=(step, clone), xytext=(step, donor),
                arrowprops=dict(arrowstyle='->', linestyle='--', color='0.25', linewidth=0.9,
                                shrinkA=0, shrinkB=2))
  refills = [(r['step'], r['new'][field]) for r in lineage if r.get('event') == 'refill'
             and _numeric([(r.get('new') or {}).get(field)])]
  if refills:
    ax.scatter(*zip(*refills), marker='>', s=30, facecolors='none', edgecolors='0.2',
               linewidths=0.9, zorder=3)
  for marker in ('o', 'x'):
    _draw_scored(ax, [p for p in _search_scores(lineage, field) if p[3] == marker], marker,
                 norm, 36 if len(slots) <= 12 else 22)
  values = [p[field] for points in slots.values() for _, p in points if _numeric([p.get(field)])]
  if values and min(values) > 0 and ('learning_rate' in field or max(values) / min(values) > 10):
    ax.set_yscale('log')
  ax.set_ylabel(field)
  ax.grid(alpha=0.3)


def _search_legend(fig: Figure, slots: dict, kind: str) -> None:
  """What the marks mean, and which line is which slot (up to 16 slots; beyond, the lines
  only show the spread)."""
  handles = []
  if kind == 'pbt':
    handles.append(Line2D([], [], color='0.25', linestyle='--', label='copy: donor → clone '
                          '(explored)'))
    handles.append(Line2D([], [], marker='o', color='0.5', linestyle='', markeredgecolor='0.2',
                          label='fitness of clone (before) and donor'))
  else:
    handles.append(Line2D([], [], marker='x', color='0.5', linestyle='', markeredgewidth=2,
                          label='cull (its fitness)'))
    handles.append(Line2D([], [], marker='>', color='0.2', linestyle='', markerfacecolor='none',
                          label='refill (new proposal)'))
  handles.append(Line2D([], [], marker='o' if kind == 'pbt' else 'x', color='black',
                        linestyle='', markerfacecolor='none', markeredgewidth=1.5,
                        label='diverged (no fitness)'))
  if len(slots) <= 16:
    handles += [line for line in fig.axes[0].get_lines() if line.get_label().startswith('slot')]
  else:
    handles.append(Line2D([], [], color='0.5', label=f'one line per slot ({len(slots)})'))
  fig.legend(handles=handles, loc='outside right upper', fontsize=8,
             ncol=2 if len(handles) > 14 else 1)


def draw_search(path: str, lineage: list[dict], metric: str) -> None:
  """A population's search as one picture (lineage.jsonl's records): for each searched field,
  each slot's value over steps (a step line per slot, changing at every exploit, explore and
  refill); pbt's copies as dashed arrows from the donor's value to the clone's after its
  explore; the moments the lineage scores (an exploit's clone and donor, a cull) coloured by
  fitness (`metric`'s, lower better: val_loss, or val_accuracy negated); culls as x, refills
  as triangles, diverged members (a null fitness) in black."""
  fields, slots = _search_timelines(lineage)
  steps = [r['step'] for r in lineage if _numeric([r.get('step')])]
  end = max(steps, default=0) + _search_interval(lineage)
  kind = 'pbt' if any(r.get('event') == 'exploit' for r in lineage) else (
      'halving' if any(r.get('event') in ('cull', 'refill') for r in lineage) else 'search')
  fitness = [f for r in lineage for f in (r.get('score'), r.get('parent_score'))
             if _numeric([f]) and np.isfinite(f)]
  norm = None
  if fitness:
    low, high = min(fitness), max(fitness)
    pad = 0 if high > low else max(abs(low) * 0.01, 1e-3)
    norm = Normalize(low - pad, high + pad)
  rows = max(1, len(fields))
  fig = _figure(12, 1.4 + rows * (3.2 if rows <= 3 else 2.2))
  axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
  for ax, field in zip(axes, fields):
    _draw_search_field(ax, field, lineage, slots, end, norm)
  if not fields:
    axes[0].text(0.5, 0.5, 'no search event recorded', ha='center', va='center',
                 transform=axes[0].transAxes)
  axes[-1].set_xlabel('step')
  if norm is not None:
    shown = metric if metric != 'val_accuracy' else '−val_accuracy'
    bar = fig.colorbar(ScalarMappable(norm, SEARCH_CMAP), ax=list(axes), shrink=0.8,
                       location='left', pad=0.02)
    bar.set_label(f'fitness = {shown} (lower is better, best at the top)')
    bar.ax.invert_yaxis()
  _search_legend(fig, slots, kind)
  copies = sum(r.get('event') == 'exploit' for r in lineage)
  culls = sum(r.get('event') == 'cull' for r in lineage)
  fig.suptitle(f'{kind} search: {len(slots)} slots, ' +
               (f'{copies} copies' if kind == 'pbt' else f'{culls} culls and refills') +
               f' (search steps up to step {max(steps, default=0):,})', fontsize=12)
  _save(fig, path)
