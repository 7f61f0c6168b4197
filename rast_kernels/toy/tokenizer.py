"""The character-level tokenizer shared by the three toy models (built with ``tokenizers``).

Every character of the task text is one token; ``<pad>``, ``<eos>`` and ``<unk>`` are special. The
id map is fixed (:data:`VOCAB`), so :func:`encode` (a fast path used in training) and the saved
``tokenizer.json`` loaded with ``transformers.AutoTokenizer`` agree exactly (checked in tests).
"""
from __future__ import annotations

from .task import EOS

PAD, UNK = "<pad>", "<unk>"
SPECIALS = [PAD, EOS, UNK]
CHARS = list("0123456789abcdefg") + list("=QSEO")
VOCAB = {t: i for i, t in enumerate(SPECIALS + CHARS)}
PAD_ID, EOS_ID, UNK_ID = VOCAB[PAD], VOCAB[EOS], VOCAB[UNK]
ID_TO_TOKEN = {i: t for t, i in VOCAB.items()}


def encode(text: str) -> list:
    """Token ids of ``text`` (characters, with ``<eos>``/``<pad>`` recognised as single tokens)."""
    ids, i = [], 0
    while i < len(text):
        for sp in SPECIALS:
            if text.startswith(sp, i):
                ids.append(VOCAB[sp])
                i += len(sp)
                break
        else:
            ids.append(VOCAB.get(text[i], UNK_ID))
            i += 1
    return ids


def decode(ids, skip_special: bool = True) -> str:
    """Inverse of :func:`encode`; specials dropped when ``skip_special``."""
    out = []
    for i in ids:
        t = ID_TO_TOKEN.get(int(i), UNK)
        if skip_special and t in SPECIALS:
            continue
        out.append(t)
    return "".join(out)


def build_tokenizer():
    """A ``transformers.PreTrainedTokenizerFast`` over :data:`VOCAB` (no BOS; EOS ``<eos>``; pad ``<pad>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join characters without spaces
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   padding_side="left", clean_up_tokenization_spaces=False)
