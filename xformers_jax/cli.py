"""The `xformers-jax` command line: train | eval | prepare | memory | compile | convert | export |
bench.

  xformers-jax train   --config configs/<family>/<job>.py:<preset> --workdir DIR [--config.K=V]
  xformers-jax prepare --config configs/<family>/<job>.py:<preset> --out DIR [--shard-records N]
                       [--config.K=V] [Beam options: --runner=DataflowRunner --project=P ...]
  xformers-jax eval    --config configs/<family>/<job>.py:<preset> --workdir DIR [--config.K=V]
  xformers-jax compile --config configs/<family>/<job>.py:<preset> --topology v5p-256
                       [--slices K] [--out FILE.json] [--config.K=V]
  xformers-jax convert --hf HF_DIR --out ORBAX_DIR [--head NAME] [--mesh fsdp=8] [--devices N]
  xformers-jax export  --checkpoint ORBAX_DIR --hf-out HF_DIR [--dtype float32|bfloat16|float16]
                       [--max-shard-size BYTES] [--step N]
  xformers-jax bench   [--suite train|yoso|decoding|mlm_logits|data|flops|all] [--family F ...]
                       [--out DIR]
                       [--n N] [--device cpu|gpu|tpu] [--dtype float32|bfloat16]
                       [--bench-config default|xlmr_xl_512|mt5_base] [--bench-set KEY=INT ...]

`--config.K=V` (or `--config.K V`) overrides any config field; see `config_lib.apply_overrides`.
User errors (bad config key or type, unknown preset, missing or unwritable path) print one line
`xformers-jax: error: <message>` on stderr and exit with code 2. The implementations are imported
only when their subcommand runs, so `--help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from xformers_jax import config_lib, paths

PROG = "xformers-jax"

# OS errors that mean "the user pointed us at a bad path", reported without a traceback.
_USER_OS_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, evaluate, convert and benchmark xformers_jax models.",
        epilog="Override any config field with --config.KEY=VALUE, e.g. --config.optim.lr=1e-4.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, help_ in (("train", "train (resuming from the workdir)"), ("eval", "evaluate")):
        p = sub.add_parser(
            name,
            help=help_,
            description=f"{help_.capitalize()}; extra --config.KEY=VALUE args override the config.",
        )
        p.add_argument(
            "--config", required=True, metavar="FILE.py[:ARG]", help="config file and preset"
        )
        p.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, logs, metrics")

    p = sub.add_parser(
        "prepare",
        help="tokenise the config's corpus into ArrayRecord shards (Apache Beam)",
        description="Reads the config's data (train_files / mixture / eval_files), tokenises it "
        "with its tokenizer (trained first if it names none) and writes ArrayRecord shards, the "
        "tokenizer and manifest.json into DIR (local or gs://), for --config.data.prepared_dir. "
        "Other --options are Apache Beam pipeline options (default: the DirectRunner on every "
        "core; e.g. --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp).",
    )
    p.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help="config and preset")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (or gs://)")
    p.add_argument(
        "--shard-records",
        type=int,
        default=None,
        metavar="N",
        help="records per shard at most: text chunks (default 65536; a shard holds consecutive "
        "chunks of one file) or images (default 1024)",
    )

    p = sub.add_parser(
        "memory",
        help="per-device params / optimizer / activation bytes of a config on a mesh",
        description="Per-device memory of a training config on N devices (no memory used). "
        "--compile adds XLA's activation figures; it needs N devices (on CPU: XLA_FLAGS="
        "--xla_force_host_platform_device_count=N).",
    )
    p.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help="config and preset")
    p.add_argument("--devices", type=int, required=True, metavar="N", help="number of devices")
    p.add_argument("--compile", action="store_true", help="compile the step for activations")

    p = sub.add_parser(
        "compile",
        help="compile the train step for a Cloud TPU topology (no TPU needed): HBM and FLOPs",
        description="Ahead-of-time compile of the exact train step for a TPU topology with "
        "libtpu on this machine; prints per-device HBM, FLOPs and compile time. A step that "
        "does not fit exits 2.",
    )
    p.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help="config and preset")
    p.add_argument(
        "--topology", required=True, metavar="NAME", help="v4-N, v5p-N, v5e-N, v6e-N (Cloud TPU)"
    )
    p.add_argument("--slices", type=int, default=1, metavar="K", help="multi-slice: K slices")
    p.add_argument(
        "--no-unrolled-flops", dest="unrolled", action="store_false",
        help="skip XLA's FLOPs of the unrolled step (a cost-only lowering: slow and memory-"
        "hungry for the largest presets); the report keeps the compiled step's count",
    )  # fmt: skip
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the result as JSON")

    p = sub.add_parser("convert", help="convert an HF checkpoint dir to an Orbax checkpoint")
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="HF dir (config.json + weights)")
    p.add_argument("--out", required=True, metavar="ORBAX_DIR", help="output Orbax dir")
    p.add_argument("--head", default=None, metavar="NAME", help="HF class, e.g. XLNetLMHeadModel")
    p.add_argument(
        "--mesh",
        default=None,
        metavar="AXIS=N,...",
        help="write sharded over a mesh of data/fsdp/tensor axes, e.g. fsdp=8 (one may be -1)",
    )
    p.add_argument("--devices", type=int, default=None, metavar="N", help="use the first N devices")

    p = sub.add_parser("export", help="export an Orbax checkpoint to an HF-format dir")
    p.add_argument("--checkpoint", required=True, metavar="ORBAX_DIR", help="Orbax checkpoint")
    p.add_argument("--hf-out", required=True, metavar="HF_DIR", help="output HF dir")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the written tensors (default float32)",
    )
    p.add_argument(
        "--max-shard-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest safetensors shard (default 5e9)",
    )
    p.add_argument("--step", type=int, default=None, help="trainer checkpoint step (latest)")

    p = sub.add_parser(
        "bench",
        help="benchmark model families, YOSO / decoding / large-vocab scaling",
        description="train: every family's train step vs transformers (bench.json/md/png). "
        "yoso, decoding, mlm_logits: scaling suites (<suite>.json/md/png); data: the input "
        "pipeline's memory and throughput (data.json/md); flops: XLA's FLOPs of each pretraining "
        "preset's step (libtpu, lowering only) next to the analytic count (flops.json/md); all: "
        "train and the scaling suites.",
    )
    p.add_argument(
        "--suite",
        choices=("train", "yoso", "decoding", "mlm_logits", "data", "flops", "all"),
        default="train",
        help="which benchmark (default: train)",
    )
    p.add_argument(
        "--family",
        action="extend",
        nargs="+",
        default=None,
        metavar="F",
        help="train- or flops-suite families to run (repeatable; default: all)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="where to write results")
    p.add_argument("--n", type=int, default=None, metavar="N", help="timed rounds per case")
    p.add_argument(
        "--device", choices=("cpu", "gpu", "tpu"), default=None, help="jax backend to run on"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (params and optimizer state stay float32)",
    )
    p.add_argument(
        "--bench-config",
        default="default",
        metavar="NAME",
        help="train suite's named config: default, xlmr_xl_512, mt5_base (bench/train.py)",
    )
    p.add_argument(
        "--bench-set",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override a bench config field, e.g. --bench-set layers=36 (repeatable)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parses the command line into (args, config overrides).

    Unknown args of the form `--config.K=V` or `--config.K V` become `K=V` overrides (only for
    `train` and `eval`); any other unknown arg is an argparse error (SystemExit(2)).

    Args:
        argv: the arguments without the program name; `None` reads `sys.argv[1:]`.

    Returns:
        The parsed namespace and the list of `key.path=value` override strings.
    """
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides: list[str] = []
    bad: list[str] = []
    i = 0
    while i < len(unknown):
        tok = unknown[i]
        if tok.startswith("--config."):
            key, sep, value = tok[len("--config.") :].partition("=")
            if not sep:  # `--config.K V`: the value is the next token (may look like `-1`).
                if i + 1 >= len(unknown) or unknown[i + 1].startswith("--"):
                    parser.error(f"{tok} needs a value: {tok}=VALUE")
                i += 1
                value = unknown[i]
            overrides.append(f"{key}={value}")
        else:
            bad.append(tok)
        i += 1
    if bad and args.command == "prepare":
        args.beam_args, bad = bad, []  # Apache Beam's pipeline options, passed through
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if overrides and args.command not in ("train", "eval", "prepare", "memory", "compile"):
        parser.error(
            "config overrides are only accepted by train, eval, prepare, memory and compile: "
            f"{overrides[0]}"
        )
    return args, overrides


def check_workdir(workdir: str) -> str:
    """Fails early, with one line, on a workdir that cannot hold checkpoints.

    Args:
        workdir: the directory (need not exist yet).

    Returns:
        The absolute path.

    Raises:
        config_lib.UserError: it exists as a non-directory, or it (or the closest existing
            ancestor, where it would be created) is not writable.
    """
    try:
        remote = paths.is_remote(workdir)
    except ValueError as e:
        raise config_lib.UserError(f"workdir: {e}") from None
    if remote:
        # Object stores have no directories to create or permissions to probe: the bucket
        # must exist (Orbax and every writer create the objects under it).
        if not paths.bucket_exists(workdir):
            bucket = paths.resolve(workdir).split("/")[2]
            raise config_lib.UserError(
                f"workdir {workdir}: bucket gs://{bucket} does not exist or cannot be listed"
            )
        return paths.resolve(workdir)
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise config_lib.UserError(f"workdir {workdir} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise config_lib.UserError(f"workdir {workdir} is not writable")
        return path
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise config_lib.UserError(
            f"workdir {workdir} cannot be created: {parent} is not a directory"
        )
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise config_lib.UserError(f"workdir {workdir} cannot be created: {parent} is not writable")
    return path


def _impl(module: str, attr: str):
    """Imports `module.attr` lazily (heavy imports only for the subcommand that runs)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # Our own module is missing, not a dependency.
            raise config_lib.UserError(f"{module} is not available in this installation") from e
        raise
    return getattr(mod, attr)


def _print_result(result: Any) -> None:
    """Prints a command's result dict as one JSON line on stdout (arrays -> python scalars)."""
    if result is None:
        return

    def default(x):
        if hasattr(x, "tolist"):
            return x.tolist()
        return str(x)

    print(json.dumps(result, default=default, sort_keys=True))


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command in ("train", "eval"):
        config = config_lib.load_config(args.config, overrides)
        workdir = check_workdir(args.workdir)
        _impl("xformers_jax.distributed", "initialize_from_env")()
        if args.command == "train":
            result = _impl("xformers_jax.train", "train_and_evaluate")(config, workdir)
        else:
            result = _impl("xformers_jax.train", "evaluate")(config, workdir)
        _print_result(result)
    elif args.command == "prepare":
        config = config_lib.load_config(args.config, overrides)
        module = "xformers_jax.data.prepare"
        if _impl("xformers_jax.data.image_prepare", "is_image_config")(config):
            module = "xformers_jax.data.image_prepare"  # image folders -> image shards
        kwargs = {} if args.shard_records is None else {"shard_records": args.shard_records}
        manifest = _impl(module, "prepare")(
            config, args.out, getattr(args, "beam_args", []), **kwargs
        )
        _print_result(_impl(module, "summary")(manifest))
    elif args.command == "memory":
        config = config_lib.load_config(args.config, overrides)
        memory = importlib.import_module("xformers_jax.memory")
        print(memory.report(memory.estimate(config, args.devices, compile=args.compile)))
    elif args.command == "compile":
        config = config_lib.load_config(args.config, overrides)
        _impl("xformers_jax.compile", "main")(
            config, args.topology, args.slices, args.out, unrolled=args.unrolled
        )
    elif args.command == "convert":
        _impl("xformers_jax.checkpoint", "convert_command")(
            args.hf, args.out, head=args.head, mesh=args.mesh, devices=args.devices
        )
    elif args.command == "export":
        kw = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
        _impl("xformers_jax.checkpoint", "export_orbax_to_hf")(
            args.checkpoint, args.hf_out, dtype=args.dtype, step=args.step, **kw
        )
    elif args.command == "bench":
        _impl("xformers_jax.bench.suites", "main")(
            args.suite,
            args.family,
            args.out,
            n=args.n,
            device=args.device,
            dtype=args.dtype,
            config=args.bench_config,
            overrides=_bench_overrides(args.bench_set),
        )
    return 0


def _bench_overrides(items: list[str]) -> dict[str, int] | None:
    """`["layers=36", ...]` -> `{"layers": 36}`; a UserError naming a malformed item."""
    out = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not (sep and key and value.lstrip("-").isdigit()):
            raise config_lib.UserError(
                f"--bench-set expects KEY=INT (e.g. layers=36), got {item!r}"
            )
        out[key] = int(value)
    return out or None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        msg = f"{e.strerror}: {e.filename}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def _restart_with_unlimited_stack() -> None:
    """Re-executes this command once with the stack limit raised to its hard limit (as `ulimit -s
    unlimited`): XLA:TPU's cost model recurses deeply on the largest presets (XLM-R xxl on
    v5p-512 overflowed the default 8 MiB stack). The limit must be set before the process
    starts for the main thread and the default thread stacks to follow it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == hard or os.environ.get("XFORMERS_JAX_STACK_RAISED") == "1":
        return
    try:
        resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
    except (ValueError, OSError):
        return
    os.environ["XFORMERS_JAX_STACK_RAISED"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "xformers_jax", *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI.

    Args:
        argv: the arguments without the program name; `None` reads `sys.argv[1:]`.

    Returns:
        The exit code: 0 on success, 2 on a usage or user error, 130 on Ctrl-C.
    """
    from xformers_jax.bench import host_alloc

    if argv is None and sys.argv[1:2] == ["compile"]:
        _restart_with_unlimited_stack()
    host_alloc.tune_for_xla_cpu()  # before jax starts its threads
    try:
        args, overrides = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed.
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return _run(args, overrides)
    except (config_lib.UserError, *_USER_OS_ERRORS) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
