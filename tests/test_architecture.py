"""The dependency rule of DESIGN §9, enforced: imports run one way, from the top of this table down.

Every ``import`` in ``medisyn/`` (at module level or inside a function) is parsed, and a
module may import only modules of its own layer or a lower one. The CLI is imported by
nobody; the stage registry names stage functions by string, and only the CLI resolves them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from medisyn.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is that of the longest prefix that matches its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "records",
        (
            "medisyn.records",
            "medisyn.phrases",
            "medisyn.images",
            "medisyn.storage",
            "medisyn.configtools",
            "medisyn.stages",
            "medisyn.presets",
        ),
    ),
    ("configs", ("medisyn.config", "medisyn.*.config")),
    ("shared", ("medisyn.models", "medisyn.raytools", "medisyn.figures")),
    ("phantoms", ("medisyn.phantoms",)),
    ("ingest", ("medisyn.ingest",)),
    ("train", ("medisyn.train",)),
    ("infer", ("medisyn.infer",)),
    ("select", ("medisyn.select",)),
    ("audit", ("medisyn.audit",)),
    ("reader", ("medisyn.reader",)),
    ("release", ("medisyn.release",)),
    ("top", ("medisyn.report", "medisyn.cli", "medisyn.submit")),
]


def layer_of(module: str) -> int | None:
    """Index of the module's layer in LAYERS; None for modules outside medisyn."""
    if not module.startswith("medisyn."):
        return 0 if module == "medisyn" else None  # the root package is empty
    best, best_len = None, -1
    parts = module.split(".")
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            pp = prefix.split(".")
            if len(pp) <= len(parts) and all(p in ("*", q) for p, q in zip(pp, parts[: len(pp)], strict=True)):
                if len(pp) > best_len:
                    best, best_len = index, len(pp)
    if best is None:
        raise AssertionError(f"{module}: not in any layer of LAYERS; add it to the table and DESIGN §9")
    return best


def imports_of(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source``; relative imports resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the package
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` imports the submodule x
            found += (
                [(node.lineno, f"{target}.{a.name}") for a in node.names]
                if not node.module
                else [(node.lineno, target)]
            )
    return found


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import that points up the table, or at the CLI: ``module:line imports target (a -> b)``."""
    out = []
    for module, (source, is_package) in sorted(sources.items()):
        own = layer_of(module)
        for line, target in imports_of(module, source, is_package):
            if target == "medisyn.cli" and module != "medisyn.cli":
                out.append(f"{module}:{line} imports medisyn.cli (nothing may; the CLI is the top)")
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                out.append(f"{module}:{line} imports {target} ({LAYERS[own][0]} -> {LAYERS[theirs][0]})")
    return out


STAGE_PACKAGES = ("phantoms", "ingest", "train", "infer", "select", "audit", "reader", "release")

# What one stage package may import from another's room (DESIGN §9); shared I/O and model helpers live in
# the layers below (records, images, models). Anything else is a stage reaching into another's room.
ACROSS_STAGES = {
    ("select", "medisyn.infer.sampling"),  # select scores checkpoints with the one generation function
    ("select", "medisyn.train.trainer"),  # the checkpoints Ray Train wrote
    ("infer", "medisyn.ingest.transforms"),  # the centre crop's geometry, for SDXL's crop conditioning
    ("train", "medisyn.train"),
    ("release", "medisyn.ingest.describe"),  # the card's source repositories and licences, from the catalog
}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "medisyn" and parts[1] in STAGE_PACKAGES else None


def crossings(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Imports from one stage package into another's that ACROSS_STAGES does not name."""
    out = []
    for module, (source, is_package) in sorted(sources.items()):
        own = stage_of(module)
        for line, target in imports_of(module, source, is_package):
            theirs = stage_of(target)
            if (
                own
                and theirs
                and theirs != own
                and not any(own == o and (target == t or target.startswith(t + ".")) for o, t in ACROSS_STAGES)
            ):
                out.append(f"{module}:{line} imports {target} ({own} -> {theirs}'s room)")
    return out


def test_no_stage_reaches_into_another_stages_room():
    """Shared image I/O (``medisyn.images``) and the VAE's helpers and identity (``medisyn.models``)
    sit below the stages: fidelity and the VAE fit once imported them from ingest's worker and from
    train's vae and cache modules."""
    problems = crossings(package_sources())
    assert not problems, "stage-to-stage imports DESIGN §9 does not name:\n" + "\n".join(problems)
    fake = {
        "medisyn.audit.fidelity": ("def f():\n    from medisyn.train.vae import reconstruct\n", False),
        "medisyn.train.vae": ("from medisyn.ingest.worker import encode_image\n", False),
        "medisyn.select.stage": ("from medisyn.infer.sampling import generate_images\n", False),
    }
    assert crossings(fake) == [
        "medisyn.audit.fidelity:2 imports medisyn.train.vae (audit -> train's room)",
        "medisyn.train.vae:1 imports medisyn.ingest.worker (train -> ingest's room)",
    ]


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in sorted((ROOT / "medisyn").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        sources[module] = (path.read_text(), is_package)
    return sources


def test_imports_run_one_way():
    problems = violations(package_sources())
    assert not problems, "imports against the dependency rule (DESIGN §9):\n" + "\n".join(problems)


def test_the_rule_catches_an_upward_import():
    fake = {
        "medisyn.records": ("import numpy\n", False),
        "medisyn.ingest.worker": ("def f():\n    from medisyn.report import run\n", False),
        "medisyn.train.loop": ("from medisyn.infer import sampling\n", False),
        "medisyn.report": ("from medisyn.cli import main\n", False),
        "medisyn.phantoms.catalog": ("from . import radiology\nfrom ..ingest import listing\n", False),
    }
    assert violations(fake) == [
        "medisyn.ingest.worker:2 imports medisyn.report (ingest -> top)",
        "medisyn.phantoms.catalog:2 imports medisyn.ingest (phantoms -> ingest)",
        "medisyn.report:1 imports medisyn.cli (nothing may; the CLI is the top)",
        "medisyn.train.loop:1 imports medisyn.infer (train -> infer)",
    ]


def test_every_module_has_a_layer():
    for module in package_sources():
        layer_of(module)  # raises for a module the table does not place


def test_registry_is_data_and_its_targets_resolve():
    source = (ROOT / "medisyn/stages.py").read_text()
    assert not [t for _, t in imports_of("medisyn.stages", source, False) if t.startswith("medisyn")]
    for stage in STAGES:
        if stage.built:
            module, fn = stage.target.split(":")
            assert callable(getattr(importlib.import_module(module), fn)), stage.target


@pytest.mark.parametrize("stage", [s for s in STAGES if s.built], ids=lambda s: s.name)
def test_every_built_stage_has_its_job_entrypoint(stage):
    job = ROOT / "jobs" / stage.job
    assert job.is_file(), f"stage {stage.name}: jobs/{stage.job} is missing"
    assert f'run("{stage.name}")' in job.read_text()


def test_job_files_are_thin_and_registered():
    registered = {s.job for s in STAGES if s.job} | {"pipeline.py", "_entry.py"}
    for job in (ROOT / "jobs").glob("*.py"):
        assert job.name in registered, f"jobs/{job.name} submits no registered stage"
        targets = {t for _, t in imports_of("jobs", job.read_text(), True)}
        assert targets <= {"_entry", "sys", "pathlib", "medisyn.cli", "medisyn.stages"}, (job.name, targets)
