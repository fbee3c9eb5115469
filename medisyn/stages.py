"""The stage registry: every pipeline stage, in order, as data.

The CLI, the ``jobs/`` entrypoints and the report all read this table; it imports nothing
of ``medisyn``. A stage's code is named by a ``"module:function"`` string that only the CLI
resolves (it sits on top of the dependency rule, DESIGN §9), so no stage, and not the
report, ever imports the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the `medisyn <name>` command
    help: str  # one line for `medisyn --help`
    target: str = ""  # "module:function" taking a RunConfig; "" = not built yet
    issue: int = 0  # the issue that builds it, when not built yet
    job: str = ""  # its `ray job submit` entrypoint under jobs/ ("" = none yet)

    @property
    def built(self) -> bool:
        return bool(self.target)


# In pipeline order (DESIGN §1). `medisyn pipeline` runs the built ones and names the rest.
STAGES = (
    Stage(
        "phantoms", "generate the offline phantom source repositories", "medisyn.phantoms.stage:run", job="phantoms.py"
    ),
    Stage(
        "ingest",
        "source repositories -> corpus parquet shards + rejects (Ray Data)",
        "medisyn.ingest.pipeline:run",
        job="ingest.py",
    ),
    Stage(
        "vae", "fit the build preset's VAE to the corpus (demo; vae_fit.enabled)", "medisyn.train.vae:run", job="vae.py"
    ),
    Stage("cache", "VAE latent moments and caption encodings (Ray Data)", "medisyn.train.cache:run", job="cache.py"),
    Stage("train", "fine-tune the SDXL U-Net (Ray Train)", "medisyn.train.trainer:run", job="train.py"),
    Stage(
        "select",
        "pick the lowest-FID epoch checkpoint and export it",
        "medisyn.select.stage:run",
        # not `select.py`: jobs/ is on sys.path when a job runs, and that would shadow the stdlib module
        job="select_checkpoint.py",
    ),
    Stage("generate", "synthetic sets by Ray Data batch inference", "medisyn.infer.generate:run", job="generate.py"),
    Stage(
        "audit-fidelity",
        "prompt fidelity: a classifier trained on real images labels the synthetic ones",
        "medisyn.audit.fidelity:run",
        job="audit_fidelity.py",
    ),
    Stage(
        "audit-memorization",
        "nearest-neighbour copy audit (embeddings, exact search, patch distance, controls)",
        "medisyn.audit.memorization:run",
        job="audit_memorization.py",
    ),
    Stage(
        "audit-utility",
        "ResNet-50 trials on real, half-real, half-real + synthetic and duplicated-real arms (Ray Tune), bootstrap CIs",
        "medisyn.audit.utility:run",
        job="audit_utility.py",
    ),
    Stage(
        "release",
        "share an audited synthetic set: Parquet shards datasets loads, a card (README, Croissant), what was left out",
        "medisyn.release.stage:run",
        job="release.py",
    ),
    Stage(
        "reader",
        "the blinded reader study: build (the pipeline's step), serve, add-reader, analyze, export",
        "medisyn.reader.study:run",
        job="reader.py",
    ),
    Stage("report", "the HTML report of every stage", "medisyn.report:run", job="report.py"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def not_built_message(stage: Stage) -> str:
    where = f" (issue #{stage.issue})" if stage.issue else ""
    return f"stage {stage.name!r} is not built yet{where}"
