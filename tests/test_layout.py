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
    ('data', 'steps'),
    ('pipeline', 'inference'),
    ('loop', 'stored_config'),
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
