"""Files and checkpoints a user names: each refusal is a message that names the file and
how to fix it, never a traceback from deep inside (torch, transformers, the decoder)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from mmtrain import checkpoint as ckpt
from mmtrain.errors import UserError, read_text


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("missing.txt", None, "does not exist"),
        ("folder", "dir", "is a folder"),
        ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), "is not UTF-8 text (invalid continuation byte at byte 3)"),
    ],
)  # fmt: skip
def test_a_file_the_user_names_is_read_as_utf8_or_refused_with_its_name(
    tmp_path, name, data, expected
):
    path = tmp_path / name
    if data == "dir":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data)
    with pytest.raises(UserError) as error:
        read_text(path, "candidates=x.txt")
    assert str(error.value).startswith(f"candidates=x.txt: {path} ") and expected in str(
        error.value
    )
    assert read_text(_file(tmp_path / "ok.txt", "\ufeffa\nb\n".encode()), "x") == "a\nb\n"


def test_an_unreadable_file_says_so(tmp_path):
    path = _file(tmp_path / "secret.txt", b"a\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: every file is readable")
        with pytest.raises(UserError, match="cannot read .*check its permissions"):
            read_text(path, "class_names=secret.txt")
    finally:
        path.chmod(0o644)


def _config(name: str, **model) -> dict:
    return {"model": {"name": name, **model}, "data": {"name": "shapes"}}


def _saved(module: nn.Module, config: dict) -> dict:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    return {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "config": config}


def test_weights_of_another_model_name_the_keys_that_differ(tmp_path):
    path = tmp_path / "best.pt"
    saved = _saved(nn.Linear(4, 3), _config("clip_fusion", fusion="concat"))
    with pytest.raises(UserError) as error:  # was RuntimeError: size mismatch for weight
        ckpt.load_weights(nn.Linear(4, 5), saved, path, _config("clip_fusion", fusion="product"))
    message = str(error.value)
    assert f"The checkpoint {path} does not fit this run's model" in message
    assert "model.fusion: 'concat' there, 'product' here" in message
    assert "size mismatch for weight" in message and "run=ITS_RUN_DIR" in message
    saved = _saved(nn.Linear(4, 3), _config("clip_contrastive", temperature=0.07))
    with pytest.raises(UserError) as error:  # another architecture: its name, not its keys
        ckpt.load_weights(nn.Linear(4, 5), saved, path, _config("clip_fusion", fusion="product"))
    assert "(model.name: 'clip_contrastive' there, 'clip_fusion' here)" in str(error.value)
    ckpt.load_weights(nn.Linear(4, 3), saved, path, _config("clip_fusion"))  # it fits: loads


def test_a_resume_whose_optimizer_does_not_fit_is_a_message(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    saved = _saved(model, _config("clip_fusion"))
    other = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(other, lambda step: 1.0)
    saved["scheduler"] = scheduler.state_dict()
    with pytest.raises(UserError, match="The optimizer state in .*last.pt does not fit this run"):
        ckpt.restore(saved, model, other, scheduler, None, tmp_path / "last.pt")


def test_a_checkpoint_with_altered_entries_is_refused(tmp_path):
    module = nn.Linear(2, 2)
    good = ckpt.snapshot(
        module, torch.optim.SGD(module.parameters(), lr=0.1),
        torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(module.parameters(), lr=0.1), lambda s: 1),
        torch.amp.GradScaler("cpu", enabled=False), {"step": 3, "epoch": 0}, _config("clip_fusion"),
    )  # fmt: skip
    ckpt.save_atomic(good, tmp_path / "good.pt")
    assert ckpt.load(tmp_path / "good.pt")["step"] == 3
    for entry, value in (("config", "model=clip_fusion"), ("step", "3")):
        ckpt.save_atomic({**good, entry: value}, tmp_path / "altered.pt")
        with pytest.raises(UserError, match=f"its {entry} entry is not what mmtrain writes"):
            ckpt.load(tmp_path / "altered.pt")


class _Payload:
    """Unpickling this runs a shell command: what a crafted weights file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_backbone_bin_runs_no_code_and_is_a_message(tmp_path):
    import pickle

    from mmtrain.data.tokenizer import build_word_tokenizer
    from mmtrain.models.backbone import build_backbone

    folder, marker = tmp_path / "backbone", tmp_path / "ran"
    tokenizer = build_word_tokenizer(["a picture"])
    config = {
        "projection_dim": 8,
        "vision": {"image_size": 16, "patch_size": 8, "hidden_size": 8, "intermediate_size": 16,
                   "num_hidden_layers": 1, "num_attention_heads": 2},
        "text": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "max_position_embeddings": 8},
    }  # fmt: skip
    build_backbone(None, config, tokenizer).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    with pytest.raises(UserError) as error:  # was _pickle.UnpicklingError from torch.load
        build_backbone(str(folder), None, tokenizer)
    assert f"model.backbone='{folder}'" in str(error.value) and "could run code" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["candidates", "class_names"])
def test_predict_refuses_a_binary_names_file_before_loading_the_run(tmp_path, key):
    from mmtrain.commands.predict import predict_run

    names = _file(tmp_path / "names.txt", bytes(range(256)))  # was UnicodeDecodeError
    args = [f"run={tmp_path / 'no-run'}", f"input={tmp_path / 'in.csv'}"]
    with pytest.raises(UserError) as error:
        predict_run([*args, f"output={tmp_path / 'out.jsonl'}", f"{key}={names}"])
    assert str(error.value).startswith(f"{key}={names}: {names} is a binary file")
    assert not (tmp_path / "out.jsonl").exists()
