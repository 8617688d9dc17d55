"""How an instruction prompt reaches the model: as raw text, or through the tokenizer's chat template.

The H2O and LESS papers prompt every model with raw text (``###\\nArticle: ...\\n\\nSummarize the above
article in 1 sentence.\\n``). An instruct model was trained on its chat template instead; without it a
small one loops on longer answers even with the full cache, and a state distilled from a looping
teacher learns to loop. ``prompt_format`` (a task setting and a ``data.answers`` setting) chooses:
``chat`` (the template), ``raw`` (the papers' text) or ``auto`` (chat when the model preset says
``instruct: true`` and its tokenizer has a template). In chat form the prompt, less its leading ``###``
separator, is the user's turn, and the evicting cache covers the whole templated prompt, system turn
included.
"""

from __future__ import annotations

from omegaconf import DictConfig

from less_exp.errors import ConfigError

FORMATS = ("auto", "chat", "raw")
SEPARATOR = "###\n"  # H2O's prompt separator: raw text needs it, a chat turn has its own bounds


def use_chat(prompt_format: str, model_cfg: DictConfig, tokenizer, setting: str = "task.prompt_format") -> bool:
    """Whether prompts go through the chat template (see the module docstring)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise ConfigError(f"{setting}=chat: the tokenizer of model={model_cfg.name} has no chat template; use {setting}=raw")
    if prompt_format == "auto":
        return has_template and bool(model_cfg.get("instruct", False))
    return prompt_format == "chat"


def with_instruction(prompt: str, instruction: str | None) -> str:
    """``prompt`` with its last paragraph (an H2O prompt's instruction) replaced by ``instruction``;
    unchanged when that is empty."""
    if not instruction:
        return prompt
    body, sep, _ = prompt.rstrip("\n").rpartition("\n\n")
    if not sep:
        raise ConfigError(f"task.instruction: the prompt {prompt[:60]!r}... has no instruction paragraph after a blank line to replace")
    return f"{body}\n\n{instruction.strip()}\n"


def render(tokenizer, prompt: str, chat: bool) -> str:
    """The text the model reads: ``prompt`` itself, or its user turn through the chat template, ready for
    the assistant's answer."""
    if not chat:
        return prompt
    user = prompt[len(SEPARATOR):] if prompt.startswith(SEPARATOR) else prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": user.strip()}], tokenize=False,
                                         add_generation_prompt=True)


def encode(tokenizer, texts: list[str], chat: bool, **kwargs):
    """Tokenize rendered texts: a chat template writes its own special tokens, raw text gets the
    tokenizer's (a BOS where the model has one)."""
    return tokenizer(texts, add_special_tokens=not chat, **kwargs)


def split_template(tokenizer, template: str, chat: bool) -> tuple[str, str]:
    """An answer-window template with a ``{text}`` field, rendered, as the text before and after it."""
    head, sep, tail = render(tokenizer, template, chat).partition("{text}")
    if not sep:
        raise ConfigError(f"data.answers.templates: {template[:60]!r} has no {{text}} field")
    return head, tail
