"""Tokenizers: a pretrained one (model.tokenizer), or a word-level one built from training texts.

CLIP's text tower pools the hidden state at the end-of-text token (the first position whose
id equals `eos_token_id`). A tokenizer built here therefore wraps every text as
`<|startoftext|> words <|endoftext|>`, and the backbone config is given the same ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtrain.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"


def build_word_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over the words of `texts`, with CLIP's special tokens.

    The special tokens take ids 0-3 (pad, unk, bos, eos): the end-of-text id is 3, never 2,
    which CLIP's text tower reserves for its legacy arg-max pooling.
    """
    # Imported here, not at the top: commands that only list or check things skip them.
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(word for word, _ in words)
    vocab = {token: index for index, token in enumerate((PAD, UNK, BOS, EOS))}
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count >= min_frequency:
            vocab[word] = len(vocab)

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizer
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    # CLIP's text tower takes no token_type_ids: without naming its inputs, transformers 4.x
    # tokenizers return them, and a model exported with this tokenizer would reject them.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_input_names=["input_ids", "attention_mask"],
    )


def load_named_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The pretrained tokenizer `model.tokenizer` names (a hub name or a saved folder); code
    it names (auto_map) runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError, KeyError) as error:
        raise UserError(
            f"model.tokenizer={name!r} does not load as a tokenizer: {error}. Give a folder "
            "written by tokenizer.save_pretrained(DIR) (tokenizer.json or the vocabulary files "
            "with tokenizer_config.json), a hub name this machine has cached, or null for a "
            "word-level tokenizer built from the training captions."
        ) from None
    if tokenizer.pad_token is None:  # GPT-2-style BPE: pad with the end-of-text token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def save_tokenizer(tokenizer: Any, run_dir: Path) -> Path:
    """Save to `run_dir/tokenizer`, where eval, predict and export look for it."""
    path = Path(run_dir) / "tokenizer"
    tokenizer.save_pretrained(path)
    return path


def load_saved_tokenizer(run_dir: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer a run saved (`save_tokenizer`); code it names runs only with
    `trust_remote_code` (the run's model.trust_remote_code)."""
    from transformers import AutoTokenizer

    path = Path(run_dir) / "tokenizer"
    if not path.is_dir():
        raise UserError(f"{path} not found: the run directory is incomplete.")
    try:  # never the code a crafted tokenizer_config.json names (auto_map), never a prompt
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if "custom code" in reason:
            reason = "it names code of its own to run (auto_map), which mmtrain never runs unless the run sets model.trust_remote_code=true"
        raise UserError(
            f"Cannot load the run's tokenizer from {path}: {reason}. Is this a run directory "
            "mmtrain wrote?"
        ) from None
