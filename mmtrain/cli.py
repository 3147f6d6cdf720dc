"""`mmtrain COMMAND [ARGS]`: each command that takes config overrides is a Hydra app."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from mmtrain.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
USAGE = """\
mmtrain: a config-driven trainer for image-text models.

Usage:
  mmtrain train [KEY=VALUE ...]        train one run into outputs/DATE/TIME/
  mmtrain train -m KEY=a,b ...         sweep: one run per combination, in multirun/DATE/TIME/N/
  mmtrain train --help                 config groups, the composed config, examples
  mmtrain eval run=RUN_DIR [split=val|test] [checkpoint=PATH]   metrics of a run's best checkpoint
  mmtrain predict run=RUN_DIR input=MANIFEST output=FILE.jsonl|.csv   one prediction per input row
  mmtrain export run=RUN_DIR out=DIR   a folder transformers loads (CLIPModel, AutoTokenizer)
  mmtrain validate [KEY=VALUE ...]     check the config and every data row; trains nothing
  mmtrain list [GROUP]                 registered components and config options
  mmtrain report SWEEP_DIR             table and plot of a multirun's jobs by metric

Examples:
  mmtrain train                                     the built-in default (synthetic shapes, CPU)
  mmtrain train model.fusion=concat optimizer.lr=3e-4
  mmtrain train --cfg job                           print the composed config and exit
  mmtrain validate data=manifest data.train=train.csv data.val=val.csv
"""
COMMANDS = ("train", "eval", "predict", "export", "validate", "list", "report")
# `validate` writes nothing: no run directory, no log file, console logging only.
VALIDATE_HYDRA = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=console")
log = logging.getLogger("mmtrain")


def _train_task(cfg: Any) -> float:
    from hydra.core.hydra_config import HydraConfig

    from mmtrain.config import validate
    from mmtrain.loop import fit

    try:
        validate(cfg)
        return fit(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as error:
        _log_to_files(f"error: {error}")  # main() prints it to the console
        raise


def _validate_task(cfg: Any) -> None:
    from mmtrain.data.validate import validate_data

    _results["bad_rows"] = len(validate_data(cfg))


_results: dict[str, int] = {}


def _log_to_files(message: str) -> None:
    """Write `message` into the run's train.log only (the console gets it from main)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _console_logging() -> None:
    """Log to the console through rich, for the commands that are not Hydra apps."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)]
    )


def _run_hydra(task: Any, args: list[str]) -> None:
    import hydra

    sys.argv = ["mmtrain", *args]
    hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="train")(task)()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmtrain` console script."""
    argv = sys.argv[1:] if argv is None else argv
    console = Console(stderr=True)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        console.print(
            f"[red]error:[/] unknown command {command!r}; choose one of: {', '.join(COMMANDS)}.\n",
            soft_wrap=True,
        )
        print(USAGE, end="", file=sys.stderr)
        return 2
    # Let exceptions reach this function: user errors are printed below without a traceback.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if command == "train":
            from mmtrain.distributed import shared_run_dir

            _run_hydra(_train_task, [*args, *shared_run_dir(args)])
        elif command == "validate":
            _results.clear()
            _run_hydra(_validate_task, [*VALIDATE_HYDRA, *args])
            if _results.get("bad_rows"):
                return 1  # the data has bad rows (2 is kept for usage errors)
        elif command == "list":
            from mmtrain.listing import print_listing

            print_listing(CONFIG_DIR, args)
        elif command == "report":
            from mmtrain.report import report

            report(args)
        else:  # eval, predict, export: they read a finished run directory
            from mmtrain import commands

            _console_logging()
            {
                "eval": commands.evaluate_run,
                "predict": commands.predict_run,
                "export": commands.export_run,
            }[command](args)
    except UserError as error:
        console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except (HydraException, OmegaConfBaseException) as error:
        console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
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
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
