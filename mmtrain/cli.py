"""`mmtrain COMMAND [ARGS]`: each command that takes config overrides is a Hydra app."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import signal
import sys
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape  # messages hold brackets: pip install 'mmtrain[wandb]'

from mmtrain.errors import Interrupted, UserError

USAGE = """\
mmtrain: a config-driven trainer for image-text models.

Usage:
  mmtrain train [KEY=VALUE ...]        train one run into outputs/DATE/TIME/
  mmtrain train -m KEY=a,b ...         sweep: one run per combination, in multirun/DATE/TIME/N/
  mmtrain train --help                 config groups, the composed config, examples
  mmtrain eval run=RUN_DIR [split=val|test] [checkpoint=PATH]   metrics and pictures of a run's best checkpoint
  mmtrain eval out=DIR [GROUP=OPTION ...] [KEY=VALUE ...]        the same for a model never trained
  mmtrain predict run=RUN_DIR input=MANIFEST output=FILE.jsonl|.csv   one prediction per input row
  mmtrain predict run=RUN_DIR input=MANIFEST output=FILE.npy|.safetensors   embeddings (contrastive)
  mmtrain export run=RUN_DIR out=DIR   a folder transformers loads (CLIPModel or SiglipModel, AutoTokenizer)
  mmtrain validate [KEY=VALUE ...]     check the config and every data row; trains nothing
  mmtrain list [GROUP]                 registered components and config options
  mmtrain report SWEEP_DIR             table and plot of a multirun's jobs by metric
  mmtrain shards MANIFEST OUT_DIR [shard_size=N ...]   webdataset tar shards from a manifest
  mmtrain resume RUN_DIR [KEY=VALUE ...]   continue a stopped run in its own directory
  mmtrain wise run=RUN_DIR alpha=A[,B,...] [out=DIR]  weight-space ensembles of start and fine-tuned (WiSE-FT)
  mmtrain soup RUN_OR_SWEEP_DIR ... [greedy=true] out=DIR   the average of runs of one backbone (model soups)
  mmtrain COMMAND --help               one command's usage;  mmtrain --version

Examples:
  mmtrain train                                     the built-in default (synthetic shapes, CPU)
  mmtrain train model.fusion=concat optimizer.lr=3e-4
  mmtrain train --cfg job                           print the composed config and exit
  mmtrain validate data=manifest data.train=train.csv data.val=val.csv
  mmtrain train --config-dir ./conf experiment=mine   your own config groups beside mmtrain's
"""
COMMANDS = (
    "train", "eval", "predict", "export", "validate", "list", "report", "shards", "resume",
)  # fmt: skip
COMMANDS += ("wise", "soup")  # runs made by averaging weights
# `validate` writes nothing: no run directory, no log file, console logging only.
VALIDATE_HYDRA = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=console")
log = logging.getLogger("mmtrain")


def config_source() -> tuple[str, Traversable]:
    """Hydra's primary config path and the folder behind it: the config groups installed
    with the package (`mmtrain.conf`, built from the repository's top-level conf/), or, when
    mmtrain runs from a source tree that was never installed, that tree's conf/."""
    if importlib.util.find_spec("mmtrain.conf") is not None:
        return "pkg://mmtrain.conf", files("mmtrain.conf")
    source_tree = Path(__file__).resolve().parent.parent / "conf"
    return str(source_tree), source_tree


def _train_task(cfg: Any) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mmtrain.launch import record_refused_job, remove_if_unused, start
    from mmtrain.sharding import refuse_unsupported
    from mmtrain.spec import parse

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        spec = parse(cfg)
        _check_sweep_direction(spec.mode, cfg, HydraConfig.get().sweeper)
        world = max(int(os.environ.get("WORLD_SIZE", 1)), spec.trainer.nproc_per_node)
        gradcache = spec.traits.accumulates_features and spec.trainer.accumulate_grad_batches > 1
        refuse_unsupported(spec.trainer, world, gradcache)
        return start(spec, cfg, run_dir)
    except (UserError, Interrupted) as error:
        _log_to_files(f"error: {error}")  # main() prints it to the console
        if HydraConfig.get().mode == RunMode.RUN:  # raised by _dispatch, without Hydra's line
            _failed.append(error)
            return math.nan
        record_refused_job(cfg, run_dir, error)  # a sweep's job: `mmtrain report` lists it
        raise
    finally:
        remove_if_unused(run_dir)  # what Hydra created for a run that never started


# Optuna (and other optimising sweepers) minimise by default; a run returns its best
# monitored value, which is often an accuracy. With hydra/sweeper=optuna on the command line
# and no direction given, mmtrain sets the direction from the monitored metric's mode.
DIRECTION_OVERRIDE = "hydra.sweeper.direction=${mmtrain_direction:}"


def _direction(cfg: Any) -> str:
    """maximize or minimize: the way a sweep should optimise what `cfg`'s run returns."""
    from mmtrain.spec import monitored, traits_of

    checkpoint = cfg.trainer.checkpoint
    _, mode = monitored(traits_of(cfg.model.name), checkpoint.monitor, checkpoint.mode)
    return "maximize" if mode == "max" else "minimize"


def _check_sweep_direction(mode: str, cfg: Any, sweeper: Any) -> None:
    """A sweeper that optimises the other way than the monitored metric (`mode`) is an
    error, before the first trial trains."""
    direction = sweeper.get("direction") if sweeper is not None else None
    if direction is None:
        return
    wanted = "maximize" if mode == "max" else "minimize"
    if str(direction).lower() != wanted:
        raise UserError(
            f"hydra.sweeper.direction={direction}, but each run returns its best "
            f"{cfg.trainer.checkpoint.monitor or 'monitored metric'}, which the sweep should "
            f"{wanted[:-1]}e (trainer.checkpoint.mode={cfg.trainer.checkpoint.mode}). Set "
            f"hydra.sweeper.direction={wanted}, or leave it out and mmtrain sets it."
        )


def _sweeps_with_optuna(args: list[str]) -> bool:
    multirun = any(a in ("-m", "--multirun") for a in args)
    sweeper = any(a.startswith("hydra/sweeper=") and "optuna" in a for a in args)
    direction = any(a.startswith("hydra.sweeper.direction=") for a in args)
    return multirun and sweeper and not direction


def _validate_task(cfg: Any) -> None:
    from mmtrain.commands.validate import validate_data

    _results["bad_rows"] = len(validate_data(cfg))


_results: dict[str, int] = {}
_failed: list[BaseException] = []  # the error that ended a single run


def _log_to_files(message: str) -> None:
    """Write `message` into the run's train.log only (the console gets it from main)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    from mmtrain.runlog import RunLogFile

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler | RunLogFile) and not getattr(
            handler, "pending", None
        ):
            handler.handle(record)


def _console_logging() -> None:
    """Log to the console through rich, for the commands that are not Hydra apps."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)]
    )


def _with_overrides(args: list[str], extra: list[str] | tuple[str, ...]) -> list[str]:
    """`args` with the overrides `extra` placed right after the user's last override: Hydra's
    parser takes one run of KEY=VALUE arguments, with its flags (--config-dir DIR, --cfg job)
    before or after it."""
    overrides = [i for i, arg in enumerate(args) if "=" in arg and not arg.startswith("-")]
    at = overrides[-1] + 1 if overrides else len(args)
    return [*args[:at], *extra, *args[at:]]


def _run_hydra(task: Any, args: list[str]) -> None:
    import hydra

    sys.argv = ["mmtrain", *args]
    config_path, _ = config_source()
    hydra.main(version_base=None, config_path=config_path, config_name="train")(task)()


def _interrupt(signum: int, frame: Any) -> None:
    """Outside the training loop (which finishes its step and saves), SIGTERM and SIGINT
    end a command at once, through the same exit path as any error."""
    name = signal.Signals(signum).name
    raise Interrupted(name, f"Interrupted by {name}; nothing was being trained, nothing is lost.")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmtrain` console script."""
    argv = sys.argv[1:] if argv is None else argv
    console = Console(stderr=True)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("--version", "-V"):
        import mmtrain

        print(f"mmtrain {mmtrain.__version__}")
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        console.print(
            f"[red]error:[/] unknown command {command!r}; choose one of: {', '.join(COMMANDS)}.\n",
            soft_wrap=True,
        )
        print(USAGE, end="", file=sys.stderr)
        return 2
    from mmtrain.commands.arguments import USAGES, wants_help

    if command in USAGES and wants_help(args):
        print(USAGES[command], end="")
        return 0
    # Let exceptions reach this function: user errors are printed below without a traceback.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # A log file on a full disk: say so once in the error below, not in a traceback per line.
    logging.raiseExceptions = False
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _dispatch(command, args, console)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _averaged_runs(command: str, args: list[str]) -> None:
    """`mmtrain wise` and `mmtrain soup`: runs made by averaging weights."""
    from mmtrain.commands.soup import soup_run
    from mmtrain.commands.wise import wise_run

    _console_logging()
    (wise_run if command == "wise" else soup_run)(args)


def _train(args: list[str]) -> None:
    """`mmtrain train`: Hydra runs `_train_task` (once, or per sweep job); mmtrain writes the
    run's .hydra files itself once it holds the run directory's lock."""
    from omegaconf import OmegaConf

    from mmtrain.launch import defer_run_files, require_plugins, shared_run_dir

    OmegaConf.register_new_resolver(
        "mmtrain_direction", lambda *, _root_: _direction(_root_), replace=True
    )
    require_plugins(args)
    args, deferred = defer_run_files(args)
    extra = [
        *deferred,
        *shared_run_dir(args),
        *([DIRECTION_OVERRIDE] if _sweeps_with_optuna(args) else []),
    ]
    _failed.clear()
    _run_hydra(_train_task, _with_overrides(args, extra))
    if _failed:
        raise _failed[0]


def _dispatch(command: str, args: list[str], console: Console) -> int:
    """Run `command`; user errors, interruptions and write failures become messages."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if command == "resume":
            from mmtrain.commands.resume import train_arguments

            command, args = "train", train_arguments(args)
        if command == "train":
            _train(args)
        elif command == "validate":
            _results.clear()
            _run_hydra(_validate_task, _with_overrides(args, VALIDATE_HYDRA))
            if _results.get("bad_rows"):
                return 1  # the data has bad rows (2 is kept for usage errors)
        elif command == "list":
            from mmtrain.commands.listing import print_listing

            print_listing(*config_source(), args)
        elif command == "report":
            from mmtrain.commands.report import report

            report(args)
        elif command == "shards":
            from mmtrain.commands.shards import write_shards

            write_shards(args)
        elif command == "eval":
            from mmtrain.commands.evaluate import evaluate_run

            _console_logging()
            evaluate_run(args, config_source()[0])
        elif command == "predict":
            from mmtrain.commands.predict import predict_run

            _console_logging()
            predict_run(args)
        elif command in ("wise", "soup"):
            _averaged_runs(command, args)
        else:  # export
            from mmtrain.commands.export import export_run

            _console_logging()
            export_run(args)
    except UserError as error:  # 2, or 1 for one that stopped a run mid-way (a lost shard)
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return getattr(error, "exit_code", 2)
    except (HydraException, OmegaConfBaseException) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as error:  # e.g. Hydra creating a run directory where it cannot
        where = f" {error.filename}" if error.filename else ""
        console.print(
            f"[red]error:[/] cannot write{where}: {error.strerror or error}. "
            "Check the path and free space, or choose another place with hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m).",
            highlight=False,
            soft_wrap=True,
        )
        return 2
    except Interrupted as error:
        console.print(f"[red]interrupted:[/] {error}", highlight=False, soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
