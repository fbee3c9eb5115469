"""``medisyn <stage> --config FILE [key=value ...]`` — one command per pipeline stage.

The config is loaded and validated before any stage starts, so a typo in a key fails in
milliseconds with the valid choices, not an hour into a cluster job. Stages are imported
lazily: ``medisyn config`` and config errors never pay for importing torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

import yaml

from medisyn.config import ConfigError, RunConfig, load_config, to_dict
from medisyn.presets import get_preset, preset_names
from medisyn.records import StageBusy, stage_lock, sweep_partial_writes
from medisyn.stages import STAGE_BY_NAME, STAGES, Stage, not_built_message

log = logging.getLogger("medisyn")

READER_ACTIONS = ("build", "serve", "add-reader", "revoke", "reissue", "analyze", "export")


def _stage_fn(stage: Stage):
    """The stage's function, imported only now (the CLI is the one module that resolves targets)."""
    module, fn = stage.target.split(":")
    return getattr(importlib.import_module(module), fn)


def run_stage(name: str, cfg: RunConfig) -> None:
    stage = STAGE_BY_NAME[name]
    if not stage.built:
        raise SystemExit(
            f"medisyn: {not_built_message(stage)}; built so far: " + ", ".join(s.name for s in STAGES if s.built)
        )
    start, wall = time.perf_counter(), time.time()
    log.info("stage %s: starting (run dir %s)", name, cfg.run_dir)
    from medisyn.raytools import check_run_dir, check_stage_resources, ensure_ray, stage_requests

    on_cluster = bool(os.environ.get("RAY_ADDRESS"))  # a submitted job
    if on_cluster or stage_requests(name, cfg, gpus=False):  # a local Ray too: an ask that never fits hangs
        ensure_ray()
        if on_cluster:  # every node must share the run dir
            check_run_dir(cfg.run_dir)
        check_stage_resources(name, cfg)  # fits the cluster at its autoscaling maximum, or stop naming the shortfall
    with stage_lock(cfg.run_path, name):
        _stage_fn(stage)(cfg)
    swept = sweep_partial_writes(cfg.run_path, before=wall)
    if swept:
        log.info("stage %s: removed %d partial writes that killed tasks left", name, swept)
    log.info("stage %s: done in %.1f s", name, time.perf_counter() - start)


def check_classes_before_ingest(cfg: RunConfig) -> None:
    """The pipeline's prompt-set labels, utility-task and reader-study classes against the phrases its
    sources can give (DESIGN §12): a typo stops here, not after ingest and training."""
    from medisyn.audit.arms import load_tasks, task_needs
    from medisyn.infer.prompts import class_needs, load_prompt_set
    from medisyn.ingest.phrases import source_phrases
    from medisyn.phrases import check_classes
    from medisyn.reader.config import load_studies, study_needs

    needs = [n for name in cfg.generate.sets if name != "fid" for n in class_needs(load_prompt_set(name))]
    needs += task_needs(load_tasks(cfg.audit_utility.tasks_file, cfg.audit_utility.tasks))
    if cfg.reader.enabled:
        needs += study_needs(load_studies(cfg.reader.studies_file, cfg.reader.studies))
    try:
        phrases, notes = source_phrases(cfg.ingest, lambda p: p.replace("{run_dir}", cfg.run_dir))
    except ConfigError as exc:  # ingest stops on the same error at once; the corpus's labels are checked later
        log.warning("pipeline: classes not checked before ingest: %s", exc)
        return
    check_classes(needs, phrases, "the configured sources", notes)


def run_pipeline(cfg: RunConfig) -> None:
    """Every built stage in order; the stages still to come are named, not silently skipped."""
    todo = [s for s in STAGES if not s.built]
    for stage in STAGES:
        off = {"phantoms": cfg.phantoms.enabled, "vae": cfg.vae_fit.enabled, "reader": cfg.reader.enabled}
        if not off.get(stage.name, True):
            continue
        if stage.name == "ingest":  # after the phantoms (they write the demo's repositories file), before any work
            check_classes_before_ingest(cfg)
        if stage.built:
            run_stage(stage.name, cfg)
    if todo:
        print(
            "pipeline: stages still to come: "
            + ", ".join(f"{s.name}" + (f" (#{s.issue})" if s.issue else "") for s in todo)
        )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="run configuration YAML (e.g. jobs/configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config value, e.g. train.epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medisyn", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    ph = sub.add_parser("phantoms", help=STAGE_BY_NAME["phantoms"].help)
    ph.add_argument("out", nargs="?", help="output folder (default: <run_dir>/phantoms from --config)")
    ph.add_argument("--seed", type=int, help="random seed (same seed, same pixels and labels)")
    ph.add_argument("--scale", choices=["small", "medium"], help="small: demo/tests; medium: ~6x more")
    ph.add_argument("--no-defects", action="store_true", help="do not plant the bad files ingest must survive")
    ph.add_argument(
        "--layout",
        choices=["demo", "flat", "paper"],
        help="demo (phantoms.layout's default): the demo repositories as their publishers ship them; flat: the same "
        "in one table per repository with a repositories.yaml (the ingest.repositories format); paper: small "
        "replicas of every paper catalog entry with their awkward rows",
    )
    ph.add_argument("--out", dest="out_dir", help="output folder (same as OUT)")
    _config_args(ph)

    for stage in STAGES[1:]:
        if stage.name == "reader":
            continue
        _config_args(
            sub.add_parser(stage.name, help=stage.help + ("" if stage.built else f" [{not_built_message(stage)}]"))
        )
    rd = sub.add_parser("reader", help=STAGE_BY_NAME["reader"].help)
    rd.usage = f"medisyn reader [{'|'.join(READER_ACTIONS)}] [options] --config FILE [key=value ...]"
    rd.add_argument("--study", help="add-reader: the study the reader reads (reader.studies_file's names)")
    rd.add_argument("--name", default="", help="add-reader: the reader's name or pseudonym, shown in exports")
    rd.add_argument("--admin", action="store_true", help="add-reader: an admin credential (progress, exports)")
    rd.add_argument(
        "--base-url", default="", help="add-reader, reissue: the address readers open (default http://host:port)"
    )
    rd.add_argument("--reader", default="", help="revoke, reissue: the reader's (or admin's) name, or its id")
    _config_args(rd)
    _config_args(sub.add_parser("pipeline", help="every built stage in order"))
    src = sub.add_parser(
        "sources", help="check: does each downloaded repository of ingest.sources match its catalog entry (no Ray)"
    )
    check = src.add_subparsers(dest="sources_action", required=True, metavar="action").add_parser(
        "check",
        help="per entry: found or absent, tables and headers, counts, a sample opened, captions; exit 1 on a mismatch",
    )
    check.add_argument("--sample", type=int, default=3, help="files per entry opened with its reader (default 3)")
    check.add_argument("--seed", type=int, default=0, help="which files the sample picks")
    _config_args(check)
    show = sub.add_parser("config", help="print the resolved, validated config and exit")
    _config_args(show)
    bench = sub.add_parser(
        "bench",
        help="throughput benchmarks (ingest, dedup, corpus, listing, train, generate, select, audit, bootstrap, "
        "classifier, embed, guidance-gap)",
    )
    bench.add_argument(
        "what",
        choices=[
            *("ingest", "dedup", "corpus", "listing", "train", "generate", "select", "audit", "bootstrap"),
            *("classifier", "embed", "guidance-gap"),
        ],
    )
    bench.add_argument("--rows", type=int, default=0, help="synthetic rows (corpus: 200,000; listing: 100,000)")
    bench.add_argument("--dir", default="", help="folder the listing bench writes its files to once (default: temp)")
    bench.add_argument("--s3", action="store_true", help="put the corpus on a local S3 server (moto; corpus)")
    bench.add_argument(
        "--before-shards", type=int, default=0, help="time the old layout on this many shards, scaled (corpus; 0: all)"
    )
    bench.add_argument(
        "--images",
        type=int,
        default=0,
        help="source images per kind (ingest: 256), hashes (dedup: 200,000), per checkpoint (select), real (audit)",
    )
    bench.add_argument("--checkpoints", type=int, default=3, help="checkpoints each arm scores (select)")
    bench.add_argument(
        "--preset",
        choices=[p for p in preset_names("diffusion") if "build" in get_preset(p)],
        default="tiny",
        help="build preset (random weights) for the train/generate/select benches",
    )
    bench.add_argument("--batch", type=int, default=0, help="samples per step (0: preset default)")
    bench.add_argument("--resolution", type=int, default=0, help="image side in pixels (0: preset default)")
    bench.add_argument("--steps", type=int, default=0, help="timed steps (0: default)")
    bench.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (bootstrap)")
    bench.add_argument(
        "--loop-resamples", type=int, default=0, help="resamples the scikit-learn loop times (0: all; bootstrap)"
    )
    bench.add_argument("--arch", default="resnet50", help="torchvision ResNet (classifier)")
    bench.add_argument("--ddp", action="store_true", help="one-process DDP, as the training loop (train)")
    bench.add_argument("--accumulation", type=int, default=1, help="micro-steps per optimizer step (train)")
    bench.add_argument(
        "--embedder", default="", help="embedder preset, or open_clip model with random weights (embed; ViT-B-16)"
    )
    bench.add_argument("--memorized", default="", help="run dir whose set memorises (guidance-gap)")
    bench.add_argument("--normal", default="", help="run dir whose set does not (guidance-gap)")
    bench.add_argument("--set", default="memorization", help="the synthetic set compared (guidance-gap)")
    bench.add_argument("--json", default="", help="also write the figures to this JSON file (every bench)")
    _config_args(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    action = "build"  # `medisyn reader --config F` (the pipeline's and the job's form) builds
    if argv[:1] == ["reader"] and len(argv) > 1 and not argv[1].startswith("-") and "=" not in argv[1]:
        action = argv.pop(1)
        if action not in READER_ACTIONS:
            print(
                f"medisyn: reader: unknown action {action!r}; expected one of {', '.join(READER_ACTIONS)}",
                file=sys.stderr,
            )
            return 2
    args = build_parser().parse_args(argv)
    args.action = action
    if args.command == "phantoms" and args.out and "=" in args.out:
        # `phantoms --config F run_dir=X`: argparse hands the first key=value to the optional OUT
        # folder; every stage takes the same `--config FILE [key=value ...]`, so it is an override
        args.overrides, args.out = [args.out, *args.overrides], None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"medisyn: config error: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, cfg)
    except (ConfigError, FileNotFoundError, StageBusy) as exc:  # a missing input, a bad set, a busy stage
        print(f"medisyn: {args.command}: {exc}", file=sys.stderr)
        return 2


def _dispatch(args, cfg: RunConfig) -> int:
    if args.command == "phantoms":
        from medisyn.phantoms.stage import run_cli

        out = args.out_dir or args.out
        if args.layout == "paper":
            from medisyn.phantoms.replicas import run_cli as write_replicas

            write_replicas(cfg, out, args.seed)
        else:
            run_cli(cfg, out=out, seed=args.seed, scale=args.scale, defects=not args.no_defects, layout=args.layout)
    elif args.command == "reader" and args.action != "build":
        return _reader(args, cfg)
    elif args.command == "config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    elif args.command == "pipeline":
        run_pipeline(cfg)
    elif args.command == "sources":
        from medisyn.ingest.check import check

        return check(cfg.ingest, lambda p: p.replace("{run_dir}", cfg.run_dir), sample=args.sample, seed=args.seed)
    elif args.command == "bench":
        if args.what == "ingest":
            from medisyn.ingest.bench import run as bench_ingest

            result = bench_ingest(cfg, images=args.images or 256)
        elif args.what == "dedup":
            from medisyn.ingest.dedup_bench import run as bench_dedup

            result = bench_dedup(
                args.images or 200_000, k=cfg.ingest.near_duplicate_bits, rms=cfg.ingest.near_duplicate_rms
            )
        elif args.what == "corpus":
            from medisyn.ingest.corpus_bench import run as bench_corpus

            result = bench_corpus(args.rows or 200_000, s3=args.s3, before_shards=args.before_shards)
        elif args.what == "listing":
            from medisyn.ingest.listing_bench import run as bench_listing

            result = bench_listing(args.rows or 100_000, folder=args.dir)
        elif args.what == "train":
            from medisyn.train.bench import run as bench_train

            bench_train(args.preset, args.batch, args.resolution, args.steps, args.ddp, args.accumulation, args.json)
        elif args.what == "audit":
            from medisyn.audit.bench import search

            result = search(n_real=args.images or 100_000)
        elif args.what == "bootstrap":
            from medisyn.audit.bench import bootstrap

            result = bootstrap(args.resamples, loop_resamples=args.loop_resamples)
        elif args.what == "classifier":
            from medisyn.audit.bench import classifier

            result = classifier(args.arch, args.resolution, args.batch, args.steps)
        elif args.what == "select":
            from medisyn.select.bench import run as bench_select

            result = bench_select(args.preset, args.images, args.checkpoints, args.steps, args.resolution)
        elif args.what == "guidance-gap":
            from medisyn.audit.gap_bench import run as bench_gap

            if not (args.memorized and args.normal):
                raise SystemExit("medisyn bench guidance-gap: give --memorized RUN_DIR and --normal RUN_DIR")
            result = bench_gap(args.memorized, args.normal, args.set)
        elif args.what == "embed":
            from medisyn.audit.embed_bench import run as bench_embed

            result = bench_embed(args.embedder, args.images, args.batch, args.steps, args.resolution)
        else:
            from medisyn.infer.bench import run as bench_generate

            result = bench_generate(args.preset, args.batch, args.resolution, args.steps)
        if args.json and args.what != "train":  # train writes its own (each recipe's peak and memory plan)
            write_bench_json(args.json, args.what, result)
    else:
        run_stage(args.command, cfg)
    return 0


def write_bench_json(path: str, what: str, result) -> None:
    """One bench's figures as JSON, with this process's peak memory: each bench of
    ``scripts/bench-gpu.sh`` runs in its own process, so the peak is that bench's."""
    import json
    import resource
    from pathlib import Path

    doc = {"bench": what, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # KiB
    torch = sys.modules.get("torch")  # imported by the bench if it needed it; never imported here for nothing
    if torch is not None and torch.cuda.is_available():
        doc.update(device=torch.cuda.get_device_name(), peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9)
    else:
        doc["device"] = "cpu"
    doc["results"] = result
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x)) + "\n")


def _reader(args, cfg: RunConfig) -> int:
    """The reader study's actions besides build (the pipeline's stage): they run on the study's
    host, against its local SQLite file, never on a Ray cluster."""
    from medisyn.reader.study import reader_dir

    folder = reader_dir(cfg)
    if args.action == "serve":
        from medisyn.reader.app import serve

        serve(folder, cfg.reader.host, cfg.reader.port)
    elif args.action in ("add-reader", "revoke", "reissue"):
        from medisyn.reader.cli import links

        return links(args, cfg, folder)
    elif args.action == "analyze":
        from medisyn.reader.analysis import analyze, table_line

        for name, summary in analyze(folder, cfg.reader.bootstrap_resamples, cfg.seed).items():
            print(f"{name}: {table_line(summary)}")
        print(f"reader: analysis in {folder / 'analysis.json'}, exports in {folder / 'exports'}")
    else:
        from medisyn.reader.analysis import export

        for path in export(folder):
            print(f"reader: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
