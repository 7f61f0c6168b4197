"""RastEngine(diagnostics=True): per-token delta diagnostics computed in the step, checked against full forwards."""
from __future__ import annotations

import math

import pytest
import torch

from rast_kernels import RastEngine

from conftest import WIDTHS, make_model


def test_diagnostics_match_full_forwards(tokenizer):
    models = [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (31, 32, 33))]
    engine = RastEngine(*models, tokenizer=tokenizer, devices="cpu", max_seq_len=64, max_batch_size=3,
                        diagnostics=True)
    V, alpha = len(tokenizer), 0.8
    prompts = ["the quick", "héllo", "a stitch"]
    for temperature in (0.0, 0.7):
        outs = engine.generate(prompts, alpha=alpha, temperature=temperature, max_new_tokens=8, eos_token_id=[],
                               seed=4)
        t = temperature or 1.0
        flips = 0
        for p, o in zip(prompts, outs):
            d = o.diagnostics
            assert set(d) == {"argmax_flip", "kl_base_rast", "p_base", "p_rast"}
            assert all(len(v) == len(o.token_ids) == 8 for v in d.values())
            seq = list(tokenizer(p)["input_ids"])
            with torch.no_grad():
                for i, tok in enumerate(o.token_ids):
                    zb, ze, zeb = (m(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1, :V].double()
                                   for m in models)
                    z = zb + alpha * (ze - zeb)
                    lb, lr = torch.log_softmax(zb / t, 0), torch.log_softmax(z / t, 0)
                    assert d["argmax_flip"][i] == bool(zb.argmax() != z.argmax())
                    assert d["p_base"][i] == pytest.approx(math.exp(lb[tok]), rel=1e-4, abs=1e-6)
                    assert d["p_rast"][i] == pytest.approx(math.exp(lr[tok]), rel=1e-4, abs=1e-6)
                    assert d["kl_base_rast"][i] == pytest.approx(float((lb.exp() * (lb - lr)).sum()), rel=1e-3,
                                                                 abs=1e-5)
                    flips += d["argmax_flip"][i]
                    seq.append(tok)
        assert 0 < flips < 24  # the random delta moves some argmaxes, not all


def test_diagnostics_off_by_default(tokenizer):
    models = [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (31, 32, 33))]
    engine = RastEngine(*models, tokenizer=tokenizer, devices="cpu", max_seq_len=32)
    assert engine.runner.state.ring_diag is None
    (out,) = engine.generate("the", max_new_tokens=3, eos_token_id=[])
    assert out.diagnostics is None
    with pytest.raises(TypeError, match="diagnostics"):
        RastEngine(*models, tokenizer=tokenizer, devices="cpu", max_seq_len=32, diagnostics=1)
