"""The package's layers (../shared/docs/LAYOUT.md): every import in digitjax/, at the top of a
module or inside a function, points to a lower layer, so there is no import cycle."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'digitjax'
# Higher layers may import lower ones only.
LAYERS = [
    ('errors', 'signals', 'augment', 'images', 'report', 'export'),
    ('configlib', 'workdir', 'parallel'),
    ('metrics', 'checkpoint', 'model'),
    ('data', 'steps', 'members', 'search'),
    ('pipeline', 'inference', 'plan'),
    ('loop', 'stored_config'),
    ('search_steps',),
    ('population',),
    ('modes',),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def imports_of(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('digitjax'):
      parts = node.module.split('.')
      names |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
    elif isinstance(node, ast.Import):
      names |= {a.name.split('.')[1] for a in node.names if a.name.startswith('digitjax.')}
  return names & set(RANK) - {path.stem}


def test_every_module_has_a_layer():
  modules = {p.stem for p in PACKAGE.glob('*.py')} - {'__init__'}
  assert modules == set(RANK), modules ^ set(RANK)


def test_imports_point_down_only():
  upward = [f'{p.stem} imports {d}' for p in sorted(PACKAGE.glob('*.py')) if p.stem in RANK
            for d in sorted(imports_of(p)) if RANK[d] >= RANK[p.stem]]
  assert not upward, upward


# Functions in digitjax/ hold at most MAX_LINES lines (their decorators and docstring included)
# and MAX_PARAMETERS parameters (self and cls not counted), so that each can be read at once.
MAX_LINES, MAX_PARAMETERS = 60, 6
# The exceptions, each with its reason; the list should shrink, never grow.
ALLOWED = {
    # Numerical kernels whose shapes and layer settings are their parameters (the model's
    # layer formulations, each tested against XLA's and benchmarked).
    'model.im2col_conv': 'parameters',
    'model.winograd_conv': 'parameters',
    'model._im2col_covers': 'parameters',
}


def function_sizes():
  """(module.function, lines, parameters) of every function, nested ones included."""
  for path in sorted(PACKAGE.glob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
        names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
        count = len([n for n in names if n not in ('self', 'cls')])
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        yield f'{path.stem}.{node.name}', node.end_lineno - start + 1, count


def test_functions_are_short_and_take_few_parameters():
  too_big = {name: f'{lines} lines, {count} parameters'
             for name, lines, count in function_sizes()
             if (lines > MAX_LINES or count > MAX_PARAMETERS) and name not in ALLOWED}
  assert not too_big, too_big


def test_the_exceptions_are_still_needed():
  sizes = {name: (lines, count) for name, lines, count in function_sizes()}
  stale = [name for name in ALLOWED if name not in sizes
           or (sizes[name][0] <= MAX_LINES and sizes[name][1] <= MAX_PARAMETERS)]
  assert not stale, f'no longer exceptions: remove them from ALLOWED: {stale}'


# Following `config` from digitjax.train call by call (tests/config_path.py defines the walk),
# a stop in a module of a higher layer than the stop before it is a climb back up: the config
# went down, came back, and is handed down again. At the commit issue 25's members.py started
# from (e9d75d7): 16 climbs, 58 stops in 10 modules; the search (issue 26) took it to 21. Since
# the plan (plan.py), the config is turned once, before any work, into the plan (plan.make)
# and, once a group's steps per epoch and choices are known, each member's recipe (plan.recipe):
# the orchestrator, the loop and the search's steps take their plain values. 7 climbs are left
# (49 stops in 11 modules): make hands the config in turn to the base check (configlib), the
# search's check, the cost estimate (whose recipe builds the model, then the step's spec) and
# the search's settings; then the orchestrator to the data, the groups and each group's
# recipes, each after a check or a resolution in configlib. The ceiling only goes down.
MAX_CLIMBS = 7


def test_config_climbs_back_up_at_most_max_climbs_times():
  import config_path
  path = config_path.config_path('__init__:train')
  names = [name for _, name in path]
  # The walk sees the whole path (a walk that found nothing would climb nowhere).
  for stop in ('population.train', 'plan.make', 'members.members_of', 'configlib.validate',
               'plan.check_cost', 'data.load_splits', 'plan.recipe', 'steps.spec'):
    assert stop in names, (stop, names)
  # Below the plan, the rooms take plain values: the loop, the search's steps and the
  # orchestrator's summary are handed no config.
  assert not [n for n in names if n.split('.')[0] in ('loop', 'search_steps', 'inference')
              or n == 'population.summarize'], names
  # The base config validated once, as are each member's, a search slot's and a cost
  # estimate's own.
  assert names.count('configlib.validate') == 4
  up = config_path.climbs(path, RANK)
  assert len(up) <= MAX_CLIMBS, up
