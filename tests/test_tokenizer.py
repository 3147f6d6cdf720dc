import torch

from mmtrain.data.tokenizer import EOS, build_word_tokenizer, save_tokenizer
from mmtrain.models.backbone import build_backbone

CAPTIONS = [
    "a red circle in the top left",
    "a blue square in the bottom right",
    "top left: red circle",
]
CONFIG = {
    "projection_dim": 16,
    "vision": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
    "text": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    },
}


def test_texts_are_wrapped_in_start_and_end_tokens():
    tokenizer = build_word_tokenizer(CAPTIONS)
    ids = tokenizer("A red circle")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id != 2  # 2 selects legacy pooling
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "circle"]
    assert tokenizer("a purple star")["input_ids"][2:4] == [tokenizer.unk_token_id] * 2


def test_text_tower_pools_at_the_end_of_text_token_so_captions_differ():
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(CAPTIONS)
    clip = build_backbone(None, CONFIG, tokenizer).eval()
    assert clip.config.text_config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer(CAPTIONS[:2], padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = clip.text_model(**batch)
    eos_positions = (batch["input_ids"] == tokenizer.eos_token_id).int().argmax(-1)
    assert eos_positions.tolist() == [8, 8]  # <|startoftext|> + 7 words
    expected = out.last_hidden_state[torch.arange(2), eos_positions]
    assert torch.allclose(out.pooler_output, expected)
    assert not torch.allclose(out.pooler_output[0], out.pooler_output[1], atol=1e-4)


def test_saved_tokenizer_loads_back_identically(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_word_tokenizer(CAPTIONS)
    loaded = AutoTokenizer.from_pretrained(save_tokenizer(tokenizer, tmp_path))
    assert loaded(CAPTIONS)["input_ids"] == tokenizer(CAPTIONS)["input_ids"]
    assert loaded.eos_token_id == tokenizer.eos_token_id


def test_the_tokenizer_gives_only_what_clips_text_tower_takes(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_word_tokenizer(["a red circle"])
    loaded = AutoTokenizer.from_pretrained(save_tokenizer(tokenizer, tmp_path))
    for each in (tokenizer, loaded):  # transformers 4.x adds token_type_ids unless told
        assert set(each(["a red circle"])) == {"input_ids", "attention_mask"}
