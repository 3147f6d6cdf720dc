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
