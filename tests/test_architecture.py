"""The package's shape: the engine imports no platform module and no Hydra, and no module imports
itself back through others (imports inside functions count: they are dependencies too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import less_exp

PACKAGE = Path(less_exp.__file__).parent
ENGINE = ("less_exp.policies", "less_exp.state", "less_exp.ops", "less_exp.adapter")
PLATFORM_LIBRARIES = {"hydra", "omegaconf", "wandb", "datasets", "lm_eval", "rouge_score", "submitit", "matplotlib"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """``(less_exp modules, top-level third-party packages)`` that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "less_exp":
                while target not in modules:
                    target = target.rpartition(".")[0]
                if target != name:
                    inner.add(target)
            else:
                outer.add(target.split(".")[0])
    return inner, outer


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles():
    graph = {name: inner for name, (inner, _) in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_engine_imports_only_the_engine():
    for name, (inner, outer) in _graph().items():
        if not name.startswith(ENGINE):
            continue
        platform = {m for m in inner if m != "less_exp" and not m.startswith(ENGINE)}
        assert not platform, f"{name} (engine) imports platform modules {platform}"
        assert not outer & PLATFORM_LIBRARIES, f"{name} (engine) imports {outer & PLATFORM_LIBRARIES}"


def test_engine_runs_without_hydra_installed(tmp_path):
    """With hydra and omegaconf unimportable, a tiny model still runs LESS through the engine alone."""
    script = """
import sys
for blocked in ("hydra", "omegaconf"):
    sys.modules[blocked] = None
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from less_exp.adapter import LessCache, build, cache_kwargs
from less_exp.policies import H2O
from less_exp.state import JointNormalizer, LessMLP, LessStates
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)
model = LlamaForCausalLM(config).eval()
states = LessStates.build(lambda: LessMLP(8, 4, 2, hidden=16, features=4, dropout=0.0), JointNormalizer, 2, 8)
build(model, H2O(heavy=4, recent=4), states)
out = model.generate(torch.arange(20)[None], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                     **cache_kwargs(LessCache(model)))
assert out.shape == (1, 25)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
