"""The package's shape: imports point one way along the data flow, no cycles, jax-free configs.

Layers (docs/architecture.md): config_lib → data → infra → diffusion → models → distill →
training → evaluation → top level (main_job, cli). A module may import its own layer and the
layers before it; a *leaf* module (one that imports nothing from dmmd_jax, e.g. the pure metrics
or data/types.py) may be imported from anywhere.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dmmd_jax"
LAYERS = ("config_lib", "data", "infra", "diffusion", "models", "distill", "training",
          "evaluation", "main_job", "cli")
RANK = {name: i for i, name in enumerate(LAYERS[:-2])} | {"main_job": 8, "cli": 8,
                                                          "__init__": 8}


def _module_name(path: pathlib.Path) -> str:
  return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _internal_imports(path: pathlib.Path, top_level_only: bool = False) -> set:
  """dmmd_jax modules `path` imports (`from dmmd_jax.x import y` counts x.y when it is one)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else ast.walk(tree)
  out = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmmd_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.add(full if _exists(full) else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("dmmd_jax."))
  return {m for m in out if m != "dmmd_jax"}


def _exists(module: str) -> bool:
  parts = module.split(".")[1:]
  return (PACKAGE.joinpath(*parts).with_suffix(".py").exists()
          or PACKAGE.joinpath(*parts, "__init__.py").exists())


def _layer(module: str) -> str:
  return module.split(".")[1]


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
           if p.name != "__init__.py" or p.parent == PACKAGE}
LEAVES = {m for m, p in MODULES.items() if not _internal_imports(p)}


def test_every_module_belongs_to_a_layer():
  assert {_layer(m) for m in MODULES} <= set(RANK)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
  upward = [target for target in _internal_imports(MODULES[module])
            if target not in LEAVES and RANK[_layer(target)] > RANK[_layer(module)]]
  assert not upward, f"{module} imports later layers: {upward}"


def test_no_import_cycles():
  graph = {m: {t for t in _internal_imports(p, top_level_only=True) if t in MODULES}
           for m, p in MODULES.items()}
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        raise AssertionError(f"import cycle: {' → '.join(stack[stack.index(nxt):] + [nxt])}")
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_the_layering_rule_catches_an_upward_import(tmp_path):
  """The rule itself can fail: a data module importing training is reported."""
  bad = tmp_path / "bad.py"
  bad.write_text("from dmmd_jax.training import loop\n")
  targets = _internal_imports(bad)
  assert targets == {"dmmd_jax.training.loop"}
  assert RANK[_layer("dmmd_jax.training.loop")] > RANK["data"]


def test_config_files_import_no_jax():
  configs = sorted((PACKAGE.parent / "configs").glob("*.py"))
  code = ("import sys; from dmmd_jax import config_lib\n"
          f"for path in {[str(p) for p in configs]!r}:\n"
          "  config_lib.load_file(path + ':tiny' if 'feature_net' not in path else path)\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'grain', "
          "'optax', 'orbax'))\n"
          "assert not bad, bad\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=PACKAGE.parent, env={"DMMD_JAX_CACHE": "/tmp/dmmd_arch_cache",
                                                 "PATH": "/usr/bin:/bin"})
  assert done.returncode == 0, done.stderr
