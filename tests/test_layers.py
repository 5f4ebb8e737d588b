"""The import layers of the two packages (docs/design.md, "Layers"): every import, at module level
or inside a function, goes to the same or a lower layer, and no two modules import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nvlm

REPO = Path(__file__).resolve().parent.parent

# nvlm's modules from the bottom up; a module may import its own layer or any lower one.
NVLM_LAYERS = (
    {"errors", "config", "files", "flags", "layers", "packing", "plot", "tokenizer", "images",
     "demo"},
    {"processing", "llm", "vision", "xattn", "demo.synth"},
    {"model", "data"},
    {"generate", "evaluate", "checkpoint", "recipes", "distributed", "stages"},
    {"demo.warmup"},
    {"train", "__main__"},
)
# Documented lazy facades, in the style of Hugging Face: NVLM.from_pretrained / save_pretrained
# call into the checkpoint module (nvlm/model.py says so).
ALLOWED_UPWARD = {("model", "checkpoint")}


def imports(package: str) -> dict[str, set[str]]:
    """module (dotted, inside the package) -> the package's modules it imports, anywhere in it."""
    root = REPO / package
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:   # relative: resolve against this module's package
                    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if node.module:   # `from . import x` imports x, not the package's __init__
                    found.add(target)
                # `from . import x` / `from pkg import module` name modules too
                found |= {f"{target}.{a.name}" for a in node.names}
                if target == "nvlm":   # the package's lazy public names load their modules
                    found |= {nvlm._PUBLIC[a.name] for a in node.names if a.name in nvlm._PUBLIC}
        known = {m for m in found if (REPO / Path(*m.split("."))).with_suffix(".py").is_file()
                 or (REPO / Path(*m.split(".")) / "__init__.py").is_file()}
        edges[module] = {m for m in known if m != module}
    return edges


def test_kernels_never_import_nvlm():
    bad = {(m, t) for m, targets in imports("nvlm_kernels").items() for t in targets
           if t == "nvlm" or t.startswith("nvlm.")}
    assert not bad


def test_kernels_do_not_import_the_compile_gate():
    """The gate and its specs are a development tool that reads the kernels; the library never
    imports them (python -m nvlm_kernels.compile_gate builds the specs on demand)."""
    tool = ("nvlm_kernels.compile_gate", "nvlm_kernels.compile_specs")
    bad = {(m, t) for m, targets in imports("nvlm_kernels").items() if not m.startswith(tool)
           for t in targets if t.startswith(tool)}
    assert not bad


def test_nvlm_imports_follow_the_layers():
    rank = {name: i for i, layer in enumerate(NVLM_LAYERS) for name in layer}
    edges = imports("nvlm")
    modules = {m.removeprefix("nvlm.") for m in edges if m != "nvlm"}
    assert modules == set(rank), f"place new modules in NVLM_LAYERS: {modules ^ set(rank)}"
    upward = []
    for module, targets in edges.items():
        source = module.removeprefix("nvlm.")
        for target in targets:
            if target == "nvlm" or not target.startswith("nvlm."):
                continue
            target = target.removeprefix("nvlm.")
            if source in rank and rank[target] > rank[source] \
                    and (source, target) not in ALLOWED_UPWARD:
                upward.append(f"{source} -> {target}")
    assert not upward, f"imports from a lower layer into a higher one: {sorted(upward)}"


def test_no_two_modules_import_each_other():
    for package in ("nvlm", "nvlm_kernels"):
        edges = imports(package)
        cycles = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets
                         if a in edges.get(b, set()) and (a, b) not in _facades()})
        assert not cycles, f"{package}: modules that import each other: {cycles}"


def _facades() -> set[tuple[str, str]]:
    pairs = {(f"nvlm.{a}", f"nvlm.{b}") for a, b in ALLOWED_UPWARD}
    return pairs | {(b, a) for a, b in pairs}


def test_the_processor_and_the_package_import_no_model():
    code = ("import sys, nvlm, nvlm.processing, nvlm.data; "
            "print(sorted(m for m in sys.modules if m.startswith('nvlm')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    for heavy in ("nvlm.model", "nvlm.llm", "nvlm.vision", "nvlm.xattn", "nvlm.train",
                  "nvlm.generate", "nvlm.checkpoint"):
        assert f"'{heavy}'" not in loaded, loaded
