"""The config's path through digitjax/, read from the source (tests/test_layout.py checks it).

    python tests/config_path.py [ENTRY]   # its stops and climbs; ENTRY: module:function
                                          # (default __init__:train, digitjax.train; or modes:run)

The path follows `config` from an entry function call by call, in the order the calls run
(a call's arguments before the call itself), into every digitjax function it is handed to:
- a stop is a call, to a function or class defined in digitjax/, that is handed the config
  itself: the ConfigDict, one of its sections (config.model...), its dict (to_dict()), or a
  member's (m.config); a field's value (config.batch_size) is what a room needs, not the config;
- the walk also goes through calls handed what holds configs (Members, their lists, a loop
  Run, Outcomes, a modes Target), so that the config is found where it is taken out of them;
  a method called on an object the config was stored in is not followed;
- a climb is a stop in a module of a higher layer (LAYERS) than the stop before it: the config
  went down to a lower room, came back up to a higher one, and is handed down again. Each call
  counts, a function handed the config twice (validated twice, parsed twice) as twice.
Every function's body is walked once, whichever branch a call is in (the walk does not know
which branches run).
"""
from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'digitjax'
SECTIONS = ('model', 'data', 'augment', 'plateau', 'sweep', 'search', 'distributed')
HOLDER_FIELDS = ('member', 'members', 'population')   # fields that hold configs
HOLDER_TYPES = ('Member', 'Outcome', 'Target', 'Run', 'Plan')  # classes whose objects hold configs
CONFIG_METHODS = ('copy_and_resolve_references', 'to_dict', 'copy')
WRAPPERS = ('enumerate', 'zip', 'list', 'tuple', 'sorted', 'reversed', 'iter', 'next')
CONFIG, HOLDER = 'config', 'holder'


class Package:
  """Each module's functions and classes, and the digitjax names it imports (anywhere)."""

  def __init__(self, folder: pathlib.Path = PACKAGE):
    self.names = {}
    for path in folder.glob('*.py'):
      tree = ast.parse(path.read_text())
      names = {n.name: (path.stem, n) for n in tree.body
               if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('digitjax'):
          parts = node.module.split('.')
          for a in node.names:  # a module (node None), or a name of a module (its name)
            names[a.asname or a.name] = ((a.name, None) if len(parts) == 1
                                         else (parts[1], a.name))
      self.names[path.stem] = names

  def lookup(self, module: str, name: str):
    """(module, node) that `name` means in `module`: a function, a class or a module (None)."""
    found = self.names.get(module, {}).get(name)
    if found is not None and isinstance(found[1], str):  # imported from another module
      return self.lookup(*found)
    return found

  def callee(self, module: str, func: ast.expr):
    """(module, function, whether its first parameter is bound) a call's `func` names."""
    chain = []
    while isinstance(func, ast.Attribute):
      chain.insert(0, func.attr)
      func = func.value
    found = self.lookup(module, func.id) if isinstance(func, ast.Name) else None
    bound = False
    for attr in chain:  # module.function, Class.method, module.Class.method
      if found is None or isinstance(found[1], ast.FunctionDef):
        return None
      where, node = found
      if node is None:
        found = self.lookup(where, attr)
        continue
      method = _method(node, attr)
      found, bound = ((where, method), not _static(method)) if method else (None, False)
    if found is None or found[1] is None:
      return None
    where, node = found
    if isinstance(node, ast.ClassDef):  # a constructor: its __init__, if it has one
      init = _method(node, '__init__')
      return (where, init, True) if init else None
    return where, node, bound


class Walk:
  """The stops of the config's path, in order: (module, 'module.function')."""

  def __init__(self, package: Package):
    self.package, self.stops, self.walked, self.module = package, [], set(), None

  def kind(self, e, held: dict):
    """CONFIG, HOLDER or None: what expression `e` is, `held` naming what each name is."""
    if isinstance(e, ast.Name):
      return held.get(e.id)
    if isinstance(e, ast.Attribute):
      inner = self.kind(e.value, held)
      if (e.attr == 'config' and inner == HOLDER) or (e.attr in SECTIONS and inner == CONFIG):
        return CONFIG
      return HOLDER if e.attr in HOLDER_FIELDS and inner == HOLDER else None
    if isinstance(e, (ast.Subscript, ast.Starred)):
      return self.kind(e.value, held)
    if isinstance(e, (ast.List, ast.Tuple, ast.Set, ast.BoolOp, ast.IfExp)):
      parts = e.elts if hasattr(e, 'elts') else e.values if hasattr(e, 'values') else [
          e.body, e.orelse]
      return _strongest(self.kind(x, held) for x in parts)
    if isinstance(e, (ast.ListComp, ast.GeneratorExp, ast.SetComp)):
      inner = dict(held)
      for g in e.generators:
        self.bind(g.target, g.iter, inner, element=True)
      return self.kind(e.elt, inner)
    if isinstance(e, ast.Call):
      if isinstance(e.func, ast.Attribute) and e.func.attr in CONFIG_METHODS:
        return self.kind(e.func.value, held)
      if isinstance(e.func, ast.Name) and e.func.id in WRAPPERS:
        return _strongest(self.kind(a, held) for a in e.args)
      return self.returned(e)
    return None

  def returned(self, call: ast.Call):
    """What a digitjax call returns, from its annotation (a holder for a holder's class)."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')
    found = self.package.callee(self.module, func)
    if found is None or found[1].name == '__init__':
      return HOLDER if name in HOLDER_TYPES else None
    text = ast.unparse(found[1].returns) if found[1].returns else ''
    if re.search(r'\bConfigDict\b', text):
      return CONFIG
    return HOLDER if any(re.search(rf'\b{t}\b', text) for t in HOLDER_TYPES) else None

  def bind(self, target, value, held: dict, element: bool = False) -> None:
    """Names of `target` take the kind of `value` (of its elements, for a loop's target)."""
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(
        target.elts) == len(value.elts):
      for t, v in zip(target.elts, value.elts):
        self.bind(t, v, held, element)
      return
    if isinstance(target, (ast.Attribute, ast.Subscript)):
      return  # a field of something is set: the names keep what they were
    kind = self.kind(value, held)
    for n in ast.walk(target):
      if isinstance(n, ast.Name):
        if kind:
          held[n.id] = kind
        else:
          held.pop(n.id, None)

  def follow(self, module: str, function: ast.FunctionDef, held: dict) -> None:
    if (module, function.lineno) in self.walked:
      return
    self.walked.add((module, function.lineno))
    caller, self.module = self.module, module
    for statement in function.body:
      self.visit(statement, held)
    self.module = caller

  def visit(self, node, held: dict) -> None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
      return  # followed where it is called, if it is handed the config
    if isinstance(node, ast.Call):
      for child in [node.func] + node.args + [k.value for k in node.keywords]:
        self.visit(child, held)
      self.call(node, held)
    elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
      inner = dict(held)
      for g in node.generators:
        self.visit(g, inner)
      for child in [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]:
        self.visit(child, inner)
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value:
      self.visit(node.value, held)
      for target in getattr(node, 'targets', None) or [node.target]:
        self.bind(target, node.value, held)
    elif isinstance(node, (ast.For, ast.comprehension)):
      self.visit(node.iter, held)
      self.bind(node.target, node.iter, held, element=True)
      for child in node.ifs if isinstance(node, ast.comprehension) else node.body + node.orelse:
        self.visit(child, held)
    elif isinstance(node, ast.withitem):
      self.visit(node.context_expr, held)
      if node.optional_vars is not None:
        self.bind(node.optional_vars, node.context_expr, held)
    else:
      for child in ast.iter_child_nodes(node):
        self.visit(child, held)

  def call(self, node: ast.Call, held: dict) -> None:
    found = self.package.callee(self.module, node.func)
    if found is None:
      return
    module, function, bound = found
    a = function.args
    params = [p.arg for p in a.posonlyargs + a.args][int(bound):]
    given = list(zip(params, node.args)) + [(k.arg, k.value) for k in node.keywords]
    handed = {p: k for p, k in ((p, self.kind(v, held)) for p, v in given) if k}
    if CONFIG in handed.values():
      self.stops.append((module, f'{"digitjax" if module == "__init__" else module}.'
                                 f'{function.name}'))
    if handed:
      self.follow(module, function, handed)


def _method(cls: ast.ClassDef, name: str):
  return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _static(function: ast.FunctionDef) -> bool:
  return any(isinstance(d, ast.Name) and d.id == 'staticmethod' for d in function.decorator_list)


def _strongest(kinds) -> str | None:
  kinds = set(kinds)
  return CONFIG if CONFIG in kinds else HOLDER if HOLDER in kinds else None


def config_path(entry: str = '__init__:train', folder: pathlib.Path = PACKAGE) -> list:
  """The stops of `config` from `entry` (module:function, its parameter `config`)."""
  package = Package(folder)
  module, name = entry.split(':')
  _, function = package.lookup(module, name)
  walk = Walk(package)
  walk.follow(module, function, {'config': CONFIG})
  return walk.stops


def climbs(stops: list, rank: dict) -> list[str]:
  """Each stop in a module of a higher layer than the stop before it, as 'from -> to'."""
  return [f'{a} -> {b}' for (ma, a), (mb, b) in zip(stops, stops[1:])
          if rank.get(mb, len(rank)) > rank.get(ma, len(rank))]


if __name__ == '__main__':
  import sys
  from test_layout import RANK
  path = config_path(*sys.argv[1:2], *[pathlib.Path(p) for p in sys.argv[2:3]])
  for module, name in path:
    print(f'{RANK.get(module, "-"):>2} {name}')
  up = climbs(path, RANK)
  print(f'{len(path)} stops in {len({m for m, _ in path})} modules; {len(up)} climbs back up:')
  print('\n'.join(f'  {c}' for c in up))
