"""The one place a run's objects are built from its spec: data aligned to the backbone, the
tokenizer, the model, the loaders, the optimizer and schedule, zero-shot prompts and the
experiment trackers. `train` (through `mmtrain.recipe`), `eval`, `predict`, `export` and
`validate` all build here; nothing else calls a component's factory.

- `training_run(spec, run_dir, device, class_names)`: a `mmtrain.run.Run`, ready to step;
  `parts(spec, run_dir)`: what it is built from before its loaders and optimizer
  (`mmtrain.assemble.training`).
- `trained(run_dir)`: a finished run rebuilt from its directory alone (config, tokenizer,
  label names, weights); `untrained(spec, out)`: the same for a model never trained
  (`mmtrain.assemble.finished`).
- `starting_state`, `plain_state`, `interpolated`, `uniform_average`, `with_weights`,
  `save_averaged`: runs made by averaging weights, WiSE-FT and model soups
  (`mmtrain.assemble.averaged`).
"""

from mmtrain.assemble.averaged import (
    interpolated,
    plain_state,
    save_averaged,
    starting_state,
    uniform_average,
    with_weights,
)
from mmtrain.assemble.finished import Trained, prediction_input, trained, untrained
from mmtrain.assemble.training import (
    Parts,
    backbone,
    data,
    loader,
    model,
    num_classes,
    parts,
    positive,
    references,
    tokenizer,
    trackers,
    training_run,
    zeroshot,
)

__all__ = [
    "interpolated",
    "plain_state",
    "save_averaged",
    "starting_state",
    "uniform_average",
    "with_weights",
    "Parts",
    "Trained",
    "backbone",
    "data",
    "loader",
    "model",
    "num_classes",
    "parts",
    "positive",
    "prediction_input",
    "references",
    "tokenizer",
    "trackers",
    "trained",
    "training_run",
    "untrained",
    "zeroshot",
]
