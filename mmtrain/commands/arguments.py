"""The `KEY=VALUE` arguments of the commands that work on a finished run."""

from __future__ import annotations

from mmtrain.errors import UserError

CONFIG_GROUPS = ("data", "model", "optimizer", "scheduler", "trainer", "zeroshot", "experiment")


def parse_args(
    args: list[str],
    required: tuple[str, ...],
    optional: tuple[str, ...],
    usage: str,
    groups: bool = False,
) -> tuple[dict[str, str], list[str]]:
    """Split `KEY=VALUE` arguments into this command's own keys and config overrides
    (anything with a dot, e.g. data.batch_size=128, and with `groups` a config group's
    option, e.g. model=clip_contrastive); `-h`/`--help` prints `usage`."""
    if "-h" in args or "--help" in args:
        print(usage.strip())
        raise SystemExit(0)
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"Expected KEY=VALUE, got {arg!r}.")
        if key in required + optional:
            own[key] = value
        elif "." in key or (groups and key in CONFIG_GROUPS):
            overrides.append(arg)
        else:
            raise UserError(
                f"Unknown argument {key!r}; this command takes {', '.join(required + optional)} and config overrides (data.batch_size=...)."
            )
    missing = [key for key in required if key not in own]
    if missing:
        raise UserError(
            f"Missing {missing[0]}=...; this command needs {' '.join(f'{k}=...' for k in required)}."
        )
    return own, overrides


# `mmtrain COMMAND --help` of the commands whose usage is not their module's docstring
# (eval, predict and export print theirs through `parse_args`; train's is Hydra's).
USAGES = {
    "validate": """\
mmtrain validate [--config-dir DIR] [GROUP=OPTION ...] [KEY=VALUE ...]

Check a training config and every row of its data as `mmtrain train` would, and train
nothing: the same overrides as train (mmtrain train --help lists the groups and keys).
Prints each split's rows and every bad row (FILE:LINE: reason when piped). Writes nothing.
Exit status: 0 every row is usable, 1 some rows are bad, 2 the config is wrong.

Example:
  mmtrain validate data=manifest data.train=train.csv data.val=val.csv
""",
    "list": """\
mmtrain list [GROUP]

Without GROUP: every config group, its YAML options and the registered components.
With GROUP (data, model, optimizer, scheduler, trainer, logger, zeroshot, experiment): each
component of the group, where it is defined, and its keys with the values a run uses (those
of the YAML option that selects it).
""",
    "report": """\
mmtrain report SWEEP_DIR

A table of the jobs of a multirun (the folder `mmtrain train -m` printed, multirun/DATE/TIME),
best first by the monitored metric, and SWEEP_DIR/report.png.
""",
    "shards": """\
mmtrain shards MANIFEST OUT_DIR [shard_size=10000] [image_root=DIR] [image_column=image]
               [text_column=text] [label_column=label|null] [on_bad_sample=error|skip]
               [max_image_pixels=100000000]

Check every row of a CSV or JSONL manifest and write the good ones as webdataset tar
shards into OUT_DIR (with sizes.json and, for text labels, classes.txt), for
data=webdataset data.train=OUT_DIR/{000000..N}.tar. Needs pip install 'mmtrain[webdataset]'.
""",
    "resume": """\
mmtrain resume RUN_DIR [KEY=VALUE ...]

Continue the run in RUN_DIR from its newest checkpoint, into the same directory, with the
overrides it was started with (RUN_DIR/.hydra/overrides.yaml): the same as
  mmtrain train SAVED_OVERRIDES [KEY=VALUE ...] trainer.resume=auto hydra.run.dir=RUN_DIR
The resumed run is the one that was never stopped. KEY=VALUE overrides follow the saved
ones (e.g. trainer.max_epochs=20 to train on; data.num_workers=4); model and data keys must
match the checkpoint's. A job started under torchrun resumes under torchrun:
  torchrun --nproc_per_node=N -m mmtrain resume RUN_DIR
""",
}


def wants_help(args: list[str]) -> bool:
    """Whether the arguments ask for the command's usage."""
    return "-h" in args or "--help" in args
