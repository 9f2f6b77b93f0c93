"""`bigscience`: the command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from bigscience_train import __version__
from bigscience_train.slurm import SlurmError


def _train(args: argparse.Namespace) -> int:
    from bigscience_train.config import load_config, load_config_file, to_yaml, validate
    from bigscience_train.train.stop import catch

    if args.config_file and args.overrides:
        raise ValueError("give either --config-file or Hydra overrides, not both")
    cfg = load_config_file(args.config_file) if args.config_file else load_config(args.overrides)
    if args.cfg:
        print(to_yaml(cfg), end="")
        return 0
    # Before torch is imported (seconds): a stop signal sent while the job starts must not kill it. A bad
    # signal name is reported with every other problem by validate() below.
    with contextlib.suppress(ValueError):
        catch(cfg.train.stop_signal)
    from bigscience_train.parallel.env import init_parallel, job_dims, launcher_env, shutdown
    from bigscience_train.train.loop import Trainer

    rank, world, _ = launcher_env()
    validate(cfg, world, check_files=True)
    hooks = []
    if cfg.train.eval_tasks:
        from evaluation.during_training import TaskEvaluation

        hooks.append(TaskEvaluation(cfg.train))
    penv = init_parallel(job_dims(cfg), cfg.parallel.timeout_minutes)
    if cfg.cluster.health_check:
        from bigscience_train.train.preflight import check_nodes

        check_nodes(cfg, penv)
    try:
        result = Trainer(cfg, penv, hooks).run()
    finally:
        shutdown()
    if rank == 0:
        print(
            f"stopped: {result.stop_reason} at step {result.state.step} "
            f"({result.state.consumed_tokens:,} tokens); run directory {cfg.run_dir}"
        )
        if result.first_val_loss is not None and result.last_val_loss is not None:
            print(f"validation loss: first {result.first_val_loss:.4f} -> last {result.last_val_loss:.4f}")
        if result.checkpoint is not None:
            print(f"checkpoint: {result.checkpoint}")
    return 0


def _data_corpus(args: argparse.Namespace) -> int:
    from data_tools.corpus import write_corpus

    n = write_corpus(Path(args.output), Path(args.folder) if args.folder else None, args.pattern)
    print(f"wrote {n} documents to {args.output}")
    return 0


def _data_tokenizer(args: argparse.Namespace) -> int:
    from data_tools.tokenizer_train import train_tokenizer

    tok = train_tokenizer(args.input, Path(args.output), args.vocab_size, args.json_key, sys.stderr.isatty())
    print(f"wrote {args.output} ({tok.get_vocab_size()} tokens)")
    return 0


def _data_preprocess(args: argparse.Namespace) -> int:
    from bigscience_train.data.tokenizer import Tokenizer
    from data_tools.preprocess import preprocess

    if (args.tokenizer is None) == (args.vocab_file is None and args.merge_file is None):
        raise ValueError(
            "give --tokenizer (a tokenizer.json) or --vocab-file and --merge-file (GPT-2's), not both"
        )
    summary = preprocess(
        args.input,
        args.output_prefix,
        Tokenizer(args.tokenizer, args.vocab_file, args.merge_file),
        args.json_key,
        args.append_eod,
        args.workers,
        args.strict,
        shard=args.shard,
        num_shards=args.num_shards,
        fast=not args.no_fast_encoder,
    )
    print(f"wrote {args.output_prefix}.bin/.idx\n{summary}")
    return 0


def _data_merge(args: argparse.Namespace) -> int:
    from data_tools.merge import merge

    documents, tokens = merge(args.input, args.output_prefix)
    print(f"wrote {args.output_prefix}.bin/.idx: {documents:,} documents, {tokens:,} tokens")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from data_tools.inspect import describe

    print(describe(args.prefix, args.tokenizer, args.sample, args.bins))
    return 0


def _ckpt_inspect(args: argparse.Namespace) -> int:
    from bigscience_train.checkpoint.inspect import describe
    from bigscience_train.config import load_config

    print(describe(args.path, load_config(args.diff) if args.diff is not None else None))
    return 0


def _ckpt_export_hf(args: argparse.Namespace) -> int:
    from bigscience_train.checkpoint.hf_export import export_hf

    out = export_hf(args.path, args.out, int(args.max_shard_gb * 1024**3))
    print(f"wrote Hugging Face BloomForCausalLM directory {out}")
    return 0


def _slurm_render(args: argparse.Namespace) -> int:
    from bigscience_train.slurm.submit import prepare_training

    prepared = prepare_training(args.overrides, force=True)
    print(prepared.script, end="", flush=True)
    print(
        f"# written to {prepared.script_path} (config: {prepared.script_path.parent / 'config.yaml'})",
        file=sys.stderr,
    )
    return 0


def _slurm_submit(args: argparse.Namespace) -> int:
    from bigscience_train.slurm.submit import active_jobs, check, prepare_training, sbatch

    fit = None
    if not args.force and not args.no_measure:
        from bigscience_train.config import load_config
        from bigscience_train.dryrun.measured_plan import measured_fit

        cfg = load_config(args.overrides)
        # Everything but memory first: a dry run of a run that cannot start is wasted.
        check(cfg, memory=False)
        fit = measured_fit(cfg, args.overrides)
        if fit is not None and not fit.fits:
            raise ValueError(
                "the layout does NOT fit, measured by a dry run of its heaviest ranks (--force submits anyway):\n"
                + "\n".join(fit.lines)
            )
    # A measured fit decides; the formula's verdict only where nothing was measured.
    prepared = prepare_training(args.overrides, force=args.force, memory=fit is None)
    for line in fit.lines if fit else []:
        print(line)
    run_dir = prepared.records[0][0]
    if args.dry_run:
        print(f"rendered {prepared.script_path} (not submitted: --dry-run)")
        return 0
    busy = active_jobs(run_dir)
    if busy and not args.force:
        raise ValueError(
            f"run {run_dir} already has job(s) {', '.join(busy)} queued or running; "
            "scancel them first, or give --force"
        )
    job_id = sbatch(prepared, "train")
    print(f"submitted job {job_id}: {prepared.script_path}\nfollow it: bigscience slurm status {run_dir}")
    return 0


def _slurm_sweep(args: argparse.Namespace) -> int:
    from bigscience_train.slurm.submit import prepare_sweep

    prepared = prepare_sweep(args.overrides, args.max_parallel, force=args.force)
    root = prepared.records[0][0]
    runs = [str(d) for d, task in prepared.records if task is not None]
    print(f"{len(runs)} runs:\n" + "\n".join(f"  {r}" for r in runs))
    return _submit_array(prepared, "sweep", args.dry_run, root)


def _submit_array(prepared, kind: str, dry_run: bool, follow: Path) -> int:
    from bigscience_train.slurm.submit import sbatch

    if dry_run:
        print(f"rendered {prepared.script_path} (not submitted: --dry-run)")
        return 0
    job_id = sbatch(prepared, kind)
    print(f"submitted array {job_id}: {prepared.script_path}\nfollow it: bigscience slurm status {follow}")
    return 0


def _slurm_eval(args: argparse.Namespace) -> int:
    from bigscience_train.slurm.submit import prepare_eval

    prepared = prepare_eval(args.run, args.overrides, args.max_parallel)
    if prepared is None:
        print(f"every checkpoint of {args.run} is already evaluated on these tasks: nothing submitted")
        return 0
    return _submit_array(prepared, "eval", args.dry_run, prepared.records[0][0])


def _slurm_status(args: argparse.Namespace) -> int:
    from bigscience_train.slurm.status import status

    code, text = status(Path(args.run))
    print(text)
    return code


def _slurm_preprocess(args: argparse.Namespace) -> int:
    from bigscience_train.slurm.submit import prepare_preprocess, sbatch

    extra = ["--json-key", args.json_key, "--workers", str(args.workers)]
    extra += ["--append-eod"] if args.append_eod else []
    shards, merge = prepare_preprocess(
        args.input, args.output_prefix, args.tokenizer, args.num_shards, extra, args.overrides
    )
    if args.dry_run:
        print(f"rendered {shards.script_path} and {merge.script_path} (not submitted: --dry-run)")
        return 0
    array = sbatch(shards, "preprocess")
    merged = sbatch(merge, "merge", dependency=f"afterok:{array}")
    print(f"submitted shard array {array} and merge job {merged} (runs after every shard succeeded)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from bigscience_train.config import ConfigError, cluster_world_size, config_problems, load_config
    from bigscience_train.config.validate import NO_END
    from bigscience_train.plan.estimate import layout_of, make_plan, search
    from bigscience_train.plan.report import format_plan, format_search

    cfg = load_config(args.overrides)
    if args.search:
        print(format_search(cfg, search(cfg, args.top)))
        return 0
    # A plan needs no end of training: without one it gives rates, not durations.
    problems = [p for p in config_problems(cfg, cluster_world_size(cfg.cluster)) if p != NO_END]
    if problems:
        raise ConfigError(problems)
    if args.measure:
        from bigscience_train.dryrun.measured_plan import format_measured, measure_plan, to_json

        results = measure_plan(cfg, args.overrides, args.rank, args.mode)
        print(to_json(results) if args.json else format_measured(results))
        return 0
    print(format_plan(cfg, make_plan(cfg, layout_of(cfg))))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from evaluation.run import main as evaluate

    return evaluate(args.overrides)


def _report(args: argparse.Namespace) -> int:
    from bigscience_train.report.build import build_report

    index, summary = build_report(Path(args.run))
    print(summary)
    print(f"report: {index}")
    return 0


def _ckpt_rollback(args: argparse.Namespace) -> int:
    from bigscience_train.checkpoint.rollback import rollback

    request = rollback(Path(args.run), args.to, args.skip_data, args.lr_scale)
    moved = request["moved_aside"]
    print(
        f"latest -> step {args.to}; "
        + (f"moved aside: {', '.join(moved)}" if moved else "no later checkpoints")
    )
    skip = request["skip_to"]
    if skip is not None:
        print(
            f"the next job skips to step {skip['step']} ({skip['consumed_samples']:,} samples) with step {args.to}'s weights"
        )
    if args.lr_scale != 1.0:
        print(f"the learning rate is scaled by {args.lr_scale:g} from then on")
    return 0


def _ckpt_import_hf(args: argparse.Namespace) -> int:
    from bigscience_train.checkpoint.hf_import import import_hf

    out = import_hf(args.dir, args.out, args.seq_length)
    print(
        f"wrote run directory {out} (weights at step 0); continue training with "
        f"`bigscience train train.load={out} train.finetune=true ...`"
    )
    return 0


def _ckpt_import_megds(args: argparse.Namespace) -> int:
    from bigscience_train.checkpoint.megds_import import import_megds
    from bigscience_train.checkpoint.safe_load import UnsafeCheckpointError

    try:
        summary = import_megds(args.dir, args.out, args.vocab_size, args.weights_only)
    except UnsafeCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.describe())
    if summary.weights_only:
        print(f"fine-tune with `bigscience train train.load={summary.out} train.finetune=true ...`")
    else:
        print(f"continue from step {summary.state.step} with `bigscience train train.load={summary.out} ...`")
    return 0


def _ckpt_export_megds(args: argparse.Namespace) -> int:
    from bigscience_train.checkpoint.megds_export import export_megds

    summary = export_megds(args.path, args.out, args.tp, args.pp, args.make_vocab_size_divisible_by)
    print(summary.describe())
    return 0


def _config_from_megds(args: argparse.Namespace) -> int:
    import json

    from bigscience_train.config.from_megds import check, convert
    from bigscience_train.config.megds_result import format_conversion, to_json

    conversion = convert(args.file)
    world, problems = check(conversion)
    if args.json:
        print(json.dumps(to_json(conversion, world, problems), indent=2))
    else:
        print(format_conversion(conversion, world, problems), end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigscience", description="Pretrain BLOOM-style GPT models.")
    parser.add_argument("--version", action="version", version=f"bigscience-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (Hydra overrides: model=gpt_350m optim.lr=3e-4 ...)")
    train.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
    train.add_argument(
        "--config-file",
        help="train from this resolved config.yaml (as Slurm jobs do) instead of the config tree",
    )
    train.add_argument("overrides", nargs="*", help="Hydra overrides")
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval",
        help="zero-shot lm-eval of a checkpoint, an HF directory or a run's checkpoints "
        "(checkpoint=|hf=|run= tasks=[...] parallel.tp=...)",
    )
    ev.add_argument(
        "overrides", nargs="*", help="checkpoint=DIR | hf=DIR | run=DIR, tasks=[...], Hydra overrides"
    )
    ev.set_defaults(func=_eval)

    data = sub.add_parser("data", help="corpus, tokenizer and Megatron .bin/.idx tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    corpus = dsub.add_parser("corpus", help="write a JSONL corpus (default: the Python standard library)")
    corpus.add_argument("--output", required=True)
    corpus.add_argument("--folder", help="one document per text file under this folder instead")
    corpus.add_argument("--pattern", default="*.txt", help="file pattern under --folder")
    corpus.set_defaults(func=_data_corpus)
    tok = dsub.add_parser("tokenizer", help="train a byte-level BPE tokenizer.json on JSONL corpora")
    tok.add_argument("--input", nargs="+", required=True)
    tok.add_argument("--output", required=True)
    tok.add_argument("--vocab-size", type=int, default=8192)
    tok.add_argument("--json-key", default="text")
    tok.set_defaults(func=_data_tokenizer)
    pre = dsub.add_parser("preprocess", help="tokenize JSONL (.jsonl, .gz, .zst, globs) into .bin/.idx")
    pre.add_argument("--input", nargs="+", required=True)
    pre.add_argument("--output-prefix", required=True)
    pre.add_argument("--tokenizer", help="a Hugging Face tokenizer.json")
    pre.add_argument("--vocab-file", help="GPT-2's vocab.json (with --merge-file, instead of --tokenizer)")
    pre.add_argument("--merge-file", help="GPT-2's merges.txt")
    pre.add_argument("--json-key", default="text")
    pre.add_argument("--append-eod", action="store_true", help="end each document with the EOD token")
    pre.add_argument("--workers", type=int, default=1)
    pre.add_argument(
        "--strict", action="store_true", help="stop at the first bad line instead of skipping it"
    )
    pre.add_argument("--shard", type=int, default=0, help="this job's shard of the input lines (0-based)")
    pre.add_argument("--num-shards", type=int, default=1, help="shards; `data merge` joins them in order")
    pre.add_argument("--no-fast-encoder", action="store_true", help="always encode with HF tokenizers")
    pre.set_defaults(func=_data_preprocess)
    mrg = dsub.add_parser("merge", help="concatenate .bin/.idx datasets (e.g. shards, in order) into one")
    mrg.add_argument("--input", nargs="+", required=True, help="dataset prefixes, in order")
    mrg.add_argument("--output-prefix", required=True)
    mrg.set_defaults(func=_data_merge)
    ins = dsub.add_parser("inspect", help="documents, tokens, length histogram, and a decoded sample")
    ins.add_argument("prefix")
    ins.add_argument("--tokenizer", help="tokenizer.json to decode the sample")
    ins.add_argument("--sample", type=int, default=0, help="document to decode")
    ins.add_argument("--bins", type=int, default=10)
    ins.set_defaults(func=_data_inspect)

    ckpt = sub.add_parser("ckpt", help="inspect and convert checkpoints")
    csub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    cin = csub.add_parser("inspect", help="step, tokens, layout, shards, parameters, config diff")
    cin.add_argument("path", help="a step directory, checkpoints/ directory or run directory")
    cin.add_argument(
        "--diff",
        nargs="*",
        metavar="OVERRIDE",
        help="compare with the config these Hydra overrides give (none: the default config)",
    )
    cin.set_defaults(func=_ckpt_inspect)
    cex = csub.add_parser("export-hf", help="write a Hugging Face BloomForCausalLM directory (safetensors)")
    cex.add_argument("path", help="a step directory, checkpoints/ directory or run directory")
    cex.add_argument("out", help="output directory (must not exist)")
    cex.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors file")
    cex.set_defaults(func=_ckpt_export_hf)
    cim = csub.add_parser(
        "import-hf", help="a Hugging Face BLOOM directory to a checkpoint of ours (weights)"
    )
    cim.add_argument("dir", help="directory with config.json, *.safetensors and tokenizer.json")
    cim.add_argument("out", help="run directory to create (must not exist)")
    cim.add_argument(
        "--seq-length", type=int, default=2048, help="model.seq_length (ALiBi has no fixed length)"
    )
    cim.set_defaults(func=_ckpt_import_hf)
    cmg = csub.add_parser(
        "import-megds",
        help="a Megatron-DeepSpeed checkpoint (regular or universal, any tp/pp) to a checkpoint of ours: "
        "weights, optimizer, step",
    )
    cmg.add_argument("dir", help="the global_stepN/ directory (or a ds_to_universal output)")
    cmg.add_argument("out", help="run directory to create (must not exist)")
    cmg.add_argument(
        "--vocab-size",
        type=int,
        help="embedding rows to write (default: the rows trained, padding included); padding rows beyond "
        "are dropped, missing ones are zeros",
    )
    cmg.add_argument(
        "--weights-only", action="store_true", help="the layer files' weights alone, without the optimizer"
    )
    cmg.set_defaults(func=_ckpt_import_megds)
    cxm = csub.add_parser(
        "export-megds",
        help="a checkpoint of ours to a DeepSpeed universal checkpoint Megatron-DeepSpeed resumes "
        "(--universal-checkpoint): weights, optimizer, step",
    )
    cxm.add_argument("path", help="a step directory, checkpoints/ directory or run directory")
    cxm.add_argument("out", help="the directory to write global_stepN/, latest_universal and latest in")
    cxm.add_argument("--tp", type=int, help="the target tensor-parallel size (default: the run's)")
    cxm.add_argument("--pp", type=int, help="the target pipeline-parallel size (default: the run's)")
    cxm.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        help="Megatron's vocabulary padding multiple, times tp (default: the run's model setting)",
    )
    cxm.set_defaults(func=_ckpt_export_megds)

    crb = csub.add_parser(
        "rollback",
        help="go back to an earlier checkpoint (after a loss spike): later ones are moved aside, not deleted",
    )
    crb.add_argument("run", help="run directory")
    crb.add_argument("--to", type=int, required=True, metavar="STEP", help="the checkpoint's step")
    crb.add_argument(
        "--skip-data",
        action="store_true",
        help="on resume, skip the batches consumed since STEP (continue from the furthest point reached)",
    )
    crb.add_argument("--lr-scale", type=float, default=1.0, help="multiply the learning rate from then on")
    crb.set_defaults(func=_ckpt_rollback)

    plan = sub.add_parser("plan", help="memory and throughput estimate of a config on its cluster")
    plan.add_argument("--search", action="store_true", help="rank the layouts that fit, fastest first")
    plan.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    plan.add_argument(
        "--measure",
        action="store_true",
        help="become one rank of the job in this process (fake process group), build and train a step of it, "
        "and measure its memory and collectives beside the plan",
    )
    plan.add_argument(
        "--rank",
        type=int,
        action="append",
        help="with --measure: this rank (repeatable); default: first and last stage",
    )
    plan.add_argument(
        "--mode",
        choices=("auto", "real", "fake"),
        default="auto",
        help="with --measure: compute the step on this CPU (real), shapes only under FakeTensorMode (fake), or "
        "real where the rank's step is small enough here (auto)",
    )
    plan.add_argument("--json", action="store_true", help="with --measure: print JSON")
    plan.add_argument("overrides", nargs="*", help="Hydra overrides (model=, parallel.*, cluster=, ...)")
    plan.set_defaults(func=_plan)

    config = sub.add_parser("config", help="convert other launch configurations into overrides of ours")
    cfgsub = config.add_subparsers(dest="config_command", required=True)
    megds = cfgsub.add_parser(
        "from-megds",
        help="a Megatron-DeepSpeed launch (argument list, or .slurm script and its DeepSpeed JSON) as "
        "overrides and a cluster preset, naming every argument it cannot map",
    )
    megds.add_argument("file", help="a file of --arguments, or a bash/Slurm script running pretrain_*.py")
    megds.add_argument("--json", action="store_true", help="overrides, unmapped arguments and notes as JSON")
    megds.set_defaults(func=_config_from_megds)

    report = sub.add_parser("report", help="plots, carbon totals and summary of a run: RUN/report/index.html")
    report.add_argument("run", help="run directory (a finished run, one still going, or a chain)")
    report.set_defaults(func=_report)

    slurm = sub.add_parser("slurm", help="render, submit and follow Slurm jobs")
    ssub = slurm.add_subparsers(dest="slurm_command", required=True)
    srender = ssub.add_parser("render", help="print the sbatch script of a run (written to RUN/slurm/)")
    srender.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. cluster=jean_zay_v100_32g")
    srender.set_defaults(func=_slurm_render)
    ssubmit = ssub.add_parser(
        "submit", help="validate, render and sbatch a run (a chain if cluster.chain_jobs > 1)"
    )
    ssubmit.add_argument("--dry-run", action="store_true", help="render only")
    ssubmit.add_argument(
        "--force",
        action="store_true",
        help="submit even if the run has jobs queued or is predicted not to fit",
    )
    ssubmit.add_argument(
        "--no-measure",
        action="store_true",
        help="decide the fit on the planner's formula alone, without the dry run of the heaviest ranks",
    )
    ssubmit.add_argument("overrides", nargs="*", help="Hydra overrides")
    ssubmit.set_defaults(func=_slurm_submit)
    ssweep = ssub.add_parser("sweep", help="one job array from Hydra sweep syntax (optim.lr=1e-4,3e-4 ...)")
    ssweep.add_argument("--max-parallel", type=int, help="tasks running at once (the array's %%K)")
    ssweep.add_argument("--dry-run", action="store_true", help="render only")
    ssweep.add_argument("--force", action="store_true", help="submit tasks predicted not to fit")
    ssweep.add_argument("overrides", nargs="*", help="Hydra overrides; comma lists and range() sweep")
    ssweep.set_defaults(func=_slurm_sweep)
    sstatus = ssub.add_parser(
        "status", help="jobs, states, step, checkpoint; exit 1 unless running or queued"
    )
    sstatus.add_argument("run", help="run directory (or a sweep's directory)")
    sstatus.set_defaults(func=_slurm_status)
    sprep = ssub.add_parser("preprocess", help="an array of preprocessing shards, then a merge job")
    sprep.add_argument("--input", nargs="+", required=True)
    sprep.add_argument("--output-prefix", required=True)
    sprep.add_argument("--tokenizer", required=True)
    sprep.add_argument("--num-shards", type=int, required=True)
    sprep.add_argument("--workers", type=int, default=1, help="processes per shard")
    sprep.add_argument("--json-key", default="text")
    sprep.add_argument("--append-eod", action="store_true")
    sprep.add_argument("--dry-run", action="store_true", help="render only")
    sprep.add_argument(
        "overrides", nargs="*", help="cluster overrides, e.g. cluster=slurm cluster.time=2:00:00"
    )
    sprep.set_defaults(func=_slurm_preprocess)
    seval = ssub.add_parser(
        "eval",
        help="an array evaluating each checkpoint of a run not yet evaluated on the tasks, or one job "
        "evaluating a Hugging Face directory; on ceil(tp x pp / cluster.procs_per_node) nodes",
    )
    seval.add_argument("run", help="run directory, or hf=DIR (a Hugging Face model directory)")
    seval.add_argument("--max-parallel", type=int, help="tasks running at once (the array's %%K)")
    seval.add_argument("--dry-run", action="store_true", help="render only")
    seval.add_argument("overrides", nargs="*", help="tasks=[...], parallel.tp=..., cluster overrides")
    seval.set_defaults(func=_slurm_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    # ConfigError and OverrideError are ValueErrors: naming them would import the config system.
    except (FileNotFoundError, FileExistsError, ValueError, SlurmError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
