"""The typed config: the trainer group and the data loader keys fail before anything is
built, naming the key and the accepted ones; the other groups fail on their factory's
signature."""

from __future__ import annotations

import pytest
from conftest import TINY, run_cli
from conftest import compose_train as _compose

from mmtrain.errors import UserError
from mmtrain.spec import BatchConfig, TrainerConfig, parse, typed


def test_the_trainer_yaml_holds_the_schemas_defaults():
    assert parse(_compose([])).trainer == TrainerConfig()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps must be a positive integer or null (got 'abc')"),
        ("trainer.max_steps=0", "trainer.max_steps must be a positive integer or null (got 0)"),
        ("trainer.grad_clip=-1", "trainer.grad_clip must be a positive number or null (got -1)"),
        ("trainer.precision=64", "trainer.precision must be one of: auto, 32, bf16, 16 (got 64)"),
        ("+trainer.logger=wandb", "Unknown key 'trainer.logger'. Accepted keys of trainer: max_epochs, max_steps"),
        ("+trainer.checkpoint.every=5", "Unknown key 'trainer.checkpoint.every'. Did you mean 'every_n_steps'? Accepted keys of trainer.checkpoint: every_n_steps, keep_last, monitor, mode"),
        ("trainer.checkpoint.mode=best", "trainer.checkpoint.mode must be one of: max, min, auto (got 'best')"),
        ("trainer.compile=maybe", "trainer.compile must be true or false (got 'maybe')"),
        ("data.batch_size=abc", "data.batch_size must be a positive integer (got 'abc')"),
        ("data.num_workers=-1", "data.num_workers must be an integer >= 0 (got -1)"),
        ("data.hard_negatives=-2", "data.hard_negatives must be an integer >= 0 (got -2)"),
        ("data.negative_sampler=nope", "Unknown negatives 'nope'"),
        ("+data.size=5", "Unknown key 'size' for data 'shapes'"),
        ("+model.fusion_layer=2", "Unknown key 'fusion_layer' for model 'clip_fusion'. Did you mean 'fusion_layers'?"),
        ("optimizer.lr=abc", "Key 'lr' of optimizer 'adamw' must be a positive number or auto (got 'abc')"),
        ("data.train_size=1e3", "Key 'train_size' of data 'shapes' must be a positive integer (got 1000.0)"),
        ("data.val_size=0", "Key 'val_size' of data 'shapes' must be a positive integer (got 0)"),
        ("data.test_size=-1", "Key 'test_size' of data 'shapes' must be an integer >= 0 (got -1)"),
        ("data=manifest data.on_bad_sample=drop", "Key 'on_bad_sample' of data 'manifest' must be one of: error, skip (got 'drop')."),
        ("data=webdataset data.shuffle_buffer=0", "Key 'shuffle_buffer' of data 'webdataset' must be a positive integer (got 0)."),
        ("data=webdataset data.samples_per_epoch=-5", "Key 'samples_per_epoch' of data 'webdataset' must be a positive integer or null (got -5)."),
        ("data=hf data.max_image_pixels=0", "Key 'max_image_pixels' of data 'hf' must be a positive integer (got 0)."),
        ("data=hf data.cache_scale=5", "Key 'cache_scale' of data 'hf' must be a number >= 1 and <= 4 (got 5)."),
        ("model.fusion_layers=true", "Key 'fusion_layers' of model 'clip_fusion' must be a positive integer (got True)"),
        ("data.augment.flip.p=often", "Key 'p' of image_augment 'flip' must be a number >= 0 and <= 1 (got 'often')"),
        ("data.hard_negatives=2", "data.hard_negatives=2, but model 'clip_fusion' takes no negative texts"),
        # Values that raised from deep inside (numpy, float(), the factory) check as rules too.
        ("optimizer.betas=ab", "Key 'betas' of optimizer 'adamw' must be a list of 2 numbers, each >= 0 and < 1 (got 'ab')"),
        ("optimizer.betas=[0.9,x]", "Key 'betas' of optimizer 'adamw' must be a list of 2 numbers, each >= 0 and < 1 (got [0.9, 'x'])"),
        ("optimizer.betas=[0.9]", "Key 'betas' of optimizer 'adamw' must be a list of 2 numbers"),
        ("model.lora.dropout=abc", "Key 'lora.dropout' of model 'clip_fusion' must be a number >= 0 and < 1 (got 'abc')"),
        ("model.lora.dropout=1.5", "Key 'lora.dropout' of model 'clip_fusion' must be a number >= 0 and < 1 (got 1.5)"),
        (f"optimizer.lr={'9' * 400}", "Key 'lr' of optimizer 'adamw' must be a finite positive number or auto (got 9999"),
        ("trainer.seed=-1", "trainer.seed must be an integer >= 0 and <= 4294967295 (got -1)"),
        ("data.seed=-3", "Key 'seed' of data 'shapes' must be an integer >= 0 (got -3)"),
    ],
)  # fmt: skip
def test_a_bad_key_or_value_names_the_key(override, expected):
    with pytest.raises(UserError) as error:
        parse(_compose(override.split()))
    assert expected in str(error.value)


def test_values_read_back_from_a_run_directory_are_typed_again():

    # .hydra/config.yaml keeps trainer.precision=16 as a number; the schema makes it "16".
    trainer = typed(TrainerConfig, {"precision": 16, "seed": 3}, "trainer")
    assert trainer.precision == "16" and trainer.seed == 3


def test_loader_keys_are_the_same_in_every_data_option():
    keys = set(BatchConfig.__dataclass_fields__)
    for option in ("shapes", "manifest"):
        cfg = _compose([f"data={option}"])
        assert keys <= set(cfg.data), option


def test_an_added_trainer_key_stops_the_command_before_anything_is_built(tmp_path):
    result = run_cli("train", *TINY, "+trainer.logger=wandb", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "Unknown key 'trainer.logger'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "tokenizer").exists() and not (tmp_path / "checkpoints").exists()


def test_a_monitor_that_is_no_metric_stops_before_training(tmp_path):
    result = run_cli(
        "train", *TINY, "trainer.checkpoint.monitor=val/acc", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "val/acc is not a validation metric of model 'clip_fusion'" in result.stderr
    assert "val/accuracy" in result.stderr and not list(tmp_path.glob("checkpoints/*.pt"))


def test_hard_negatives_need_a_model_that_takes_them(tmp_path):
    result = run_cli("train", *TINY, "data.hard_negatives=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model 'clip_fusion' takes no negative texts" in result.stderr
