"""What :meth:`RastEngine.generate` returns per prompt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

FINISH_REASONS = ("stop", "length", "error", "abort")


@dataclass
class GenerationOutput:
    """One sample's result (or, from :meth:`RastEngine.step`, its progress so far).

    Attributes
    ----------
    text : str
        The generated text: ``tokenizer.decode(token_ids, skip_special_tokens=True,
        clean_up_tokenization_spaces=False)``, cut just before the first stop string if one matched.
    token_ids : list[int]
        Generated token ids. An EOS token that ended the row is not included; when a stop string
        matched, the ids run up to and including the token that completed it (the text is cut, the
        tokens cannot be).
    num_prompt_tokens : int
        Tokens in the (tokenized) prompt.
    finish_reason : {"stop", "length", "error", "abort"} or None
        ``"stop"``: an EOS id was sampled or a stop string appeared; ``"length"``: ``max_new_tokens``
        were generated; ``"error"``: the sampler rejected the row (see ``error``); ``"abort"``: the request was
        aborted (:meth:`RastEngine.abort_request`); None while the sample is still running.
    stop_reason : int, str or None
        The EOS id or the stop string that ended the row (None unless ``finish_reason == "stop"``).
    error : str or None
        For ``"error"`` rows: which decode step failed and why.
    logprobs : list[float] or None
        With ``return_logprobs=True``: the log-probability of each id in ``token_ids`` under the final
        filtered, renormalised distribution it was drawn from (0.0 for greedy steps).
    request_id : str or None
        The engine's id of the request.
    prompt_index, sample_index : int
        Which prompt of a :meth:`RastEngine.generate` call (0 for :meth:`RastEngine.add_request`) and which of its
        ``n`` samples this is.
    finished : bool
        False for a progress update of a running sample (:meth:`RastEngine.step`): ``text`` is then the part
        that can no longer change.
    diagnostics : dict or None
        With ``RastEngine(diagnostics=True)``: per token of ``token_ids``, ``argmax_flip`` (bool: the delta moved
        the argmax relative to the base alone), ``kl_base_rast`` (``KL(p_base || p_rast)`` at the row's
        temperature), ``p_base`` and ``p_rast`` (the token's probability under the base alone and under RAST).
    """

    text: str
    token_ids: list = field(default_factory=list)
    num_prompt_tokens: int = 0
    finish_reason: Optional[str] = "length"
    stop_reason: Optional[Union[int, str]] = None
    error: Optional[str] = None
    logprobs: Optional[list] = None
    request_id: Optional[str] = None
    prompt_index: int = 0
    sample_index: int = 0
    finished: bool = True
    diagnostics: Optional[dict] = None
