"""Tiny random-initialised models and a byte-level tokenizer, built in memory with no download.

Tests and smoke runs use them: any transformers model family can be instantiated from a small
config, and a byte-level tokenizer covers every text without a vocabulary file.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from huggingface_hub.errors import StrictDataclassError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from less_exp.errors import ConfigError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0-255) plus pad, bos and eos (ids 256-258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=_byte_of))}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
    )


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to ``ch``."""
    return _BYTE_OF_CHAR[ch]


def _gpt2_char_table() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF_CHAR = _gpt2_char_table()


def build_tiny(model_cfg: DictConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised model of family ``model_cfg.model_type``, seeded by ``model_cfg.seed``."""
    tokenizer = byte_tokenizer()
    overrides = OmegaConf.to_container(model_cfg.config, resolve=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(model_cfg.seed))
    try:
        config = AutoConfig.for_model(
            model_cfg.model_type,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **overrides,
        )
        if config.vocab_size < len(tokenizer):
            raise ValueError(f"model.config.vocab_size must be at least {len(tokenizer)} for the byte tokenizer")
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    except (ValueError, TypeError, KeyError, RuntimeError, StrictDataclassError) as err:
        cause = " ".join(str(err.__cause__ or err).split())
        raise ConfigError(f"model={model_cfg.name}: its model.config makes no valid {model_cfg.model_type} model "
                          f"({cause[:300]}); fix the model.config override") from None
    finally:
        torch.random.set_rng_state(generator_state)
    return model, tokenizer
