"""Incremental text and stop strings (rast_kernels.engine.detokenize) against full decodes."""
from __future__ import annotations

import random

from rast_kernels.engine.detokenize import IncrementalText, final_text, find_stop, stop_prefix


def _decode(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_incremental_text_equals_full_decode_whatever_the_chunks(tokenizer):
    decode = _decode(tokenizer)
    rng = random.Random(0)
    for text in ("héllo wörld, naïve café — déjà vu", "日本語のテキスト と 中文 文本 混合", "the quick brown fox"):
        ids = tokenizer(text)["input_ids"]
        for _ in range(5):
            inc, i = IncrementalText(decode, ()), 0
            while i < len(ids):
                k = rng.randint(1, 3)
                inc.extend(ids[i:i + k])
                i += k
                assert decode(ids[:i]).startswith(inc.text)  # never ahead of the truth, never wrong
                assert not inc.text.endswith("\ufffd")
            assert inc.text == decode(ids) == inc.stable()


def test_stop_strings_across_chunk_boundaries(tokenizer):
    decode = _decode(tokenizer)
    ids = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    for stop in ("brown fox", "o", "lazy dog", "x j"):
        for k in (1, 2, 5):
            inc = IncrementalText(decode, ("never", stop))
            seen = False
            for i in range(0, len(ids), k):
                seen = inc.extend(ids[i:i + k])
                if seen:
                    break
            assert seen, (stop, k)
            full = decode(ids)
            assert inc.stable() == full[:full.index(stop)]
            assert inc.stop_at == full.index(stop)
    inc = IncrementalText(decode, ("zebra",))
    assert not inc.extend(ids) and inc.stable() == decode(ids)[:-4]  # the tail that could start "zebra" is held


def test_final_text_and_stop_prefix(tokenizer):
    decode = _decode(tokenizer)
    ids = tokenizer("a stitch in time saves nine")["input_ids"]
    text, toks, stop = final_text(decode, ids, ["time"])
    assert text == "a stitch in " and stop == "time" and "time" in decode(toks) and "time" not in decode(toks[:-1])
    assert final_text(decode, ids, []) == (decode(ids), ids, None)
    assert stop_prefix(decode, ids, ["zzz"]) == (None, None)
    assert find_stop("abcabc", ["c", "b"]) == (1, "b") and find_stop("abcabc", ["b"], start=2) == (4, "b")
