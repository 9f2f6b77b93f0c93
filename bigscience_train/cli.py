"""`bigscience`: the command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigscience_train.config import ConfigError, OverrideError


def _train(args: argparse.Namespace) -> int:
    from bigscience_train.config import load_config, to_yaml, validate
    from bigscience_train.parallel.env import init_parallel, launcher_env, shutdown
    from bigscience_train.train.loop import Trainer

    cfg = load_config(args.overrides)
    if args.cfg:
        print(to_yaml(cfg), end="")
        return 0
    rank, world, _ = launcher_env()
    validate(cfg, world, check_files=True)
    unsupported = [
        f"{setting}: not available in this version yet"
        for setting, wanted in (
            (f"parallel.pp={cfg.parallel.pp}", cfg.parallel.pp > 1),
            ("parallel.sequence_parallel=true", cfg.parallel.sequence_parallel),
        )
        if wanted
    ]
    if unsupported:
        raise ConfigError(unsupported)
    penv = init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp)
    try:
        result = Trainer(cfg, penv).run()
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
    from data_tools.preprocess import preprocess

    summary = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        args.json_key,
        args.append_eod,
        args.workers,
        args.strict,
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigscience", description="Pretrain BLOOM-style GPT models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (Hydra overrides: model=gpt_350m optim.lr=3e-4 ...)")
    train.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", help="Hydra overrides")
    train.set_defaults(func=_train)

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
    pre.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OverrideError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
