"""Prompt templates: how a problem's text becomes the prompt the models see.

Named templates (``TEMPLATES``):

``rast``
    The RAST paper's prompt, no chat formatting: ``"Question:\\n{input}\\nAnswer:\\nLet's think step by step.\\n"``.
``boxed``
    ``"{input}\\nPlease reason step by step, and put your final answer within \\\\boxed{}."``
``chat``
    The ``boxed`` text as one user message through the tokenizer's chat template (with the generation prompt);
    only for tokenizers that have one.
``raw``
    The problem text as is (the toy task's prompts, ``Q<bits>=``, are complete prompts).

Anything else is a path to a custom template file, which must contain ``{input}``. ``{input}`` is replaced
literally (no ``str.format``), so LaTeX braces elsewhere in a template need no escaping.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

RAST = "Question:\n{input}\nAnswer:\nLet's think step by step.\n"
BOXED = "{input}\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = {"rast": RAST, "boxed": BOXED, "chat": BOXED, "raw": "{input}"}
PLACEHOLDER = "{input}"


@dataclass(frozen=True)
class Template:
    name: str
    text: str
    chat: bool = False

    def render(self, problem: str, tokenizer=None) -> str:
        """The prompt for ``problem``; a chat template needs the ``tokenizer`` (``ValueError`` naming
        ``template`` when it has no chat template)."""
        body = self.text.replace(PLACEHOLDER, problem)
        if not self.chat:
            return body
        check_chat(tokenizer)
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)


def check_chat(tokenizer) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template: 'chat' needs a tokenizer with a chat template (this one has none); "
                         "use rast, boxed or a template file")


def resolve_template(spec: str) -> Template:
    """A named template or a template file (module docstring); ``ValueError`` naming ``template`` for a file
    that does not exist or lacks ``{input}``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"template: expected a name ({', '.join(TEMPLATES)}) or a file, got {spec!r}")
    if spec in TEMPLATES:
        return Template(spec, TEMPLATES[spec], chat=spec == "chat")
    if not os.path.isfile(spec):
        raise ValueError(f"template: {spec!r} is neither a template name ({', '.join(TEMPLATES)}) nor a file")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    if PLACEHOLDER not in text:
        raise ValueError(f"template: {spec!r} does not contain {PLACEHOLDER} (where the problem goes)")
    return Template(os.path.basename(spec), text)


def default_template(dataset_kind: str) -> str:
    """``raw`` for the toy task (its prompts are complete), ``rast`` for everything else."""
    return "raw" if dataset_kind == "toy" else "rast"


def render_all(template: Template, problems, tokenizer: Optional[object] = None) -> list:
    return [template.render(p, tokenizer) for p in problems]
