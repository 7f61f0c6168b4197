"""The training script's smallest setting runs end to end (CI smoke; seconds) and writes a loadable trio."""
import json

from rast_kernels.toy import train


def test_smoke_training(tmp_path):
    out = tmp_path / "trio"
    assert train.main(["--smoke", "--out", str(out)]) == 0
    with open(out / "eval.json") as f:
        ev = json.load(f)
    assert ev["seed"] == 0 and ev["config"]["rl_steps"] == 3 and len(ev["rl_history"]) == 3
    rows = {(r["row"], r["decoding"]) for r in ev["table"]}
    assert ("base + delta (alpha=1)", "sample") in rows and ("expert", "greedy") in rows
    models = train.load_trio(str(out))
    assert set(models) == {"base", "expert", "expert_base"}
    for role in models:  # package data must be readable by every user once installed
        for f in (out / role).iterdir():
            assert f.stat().st_mode & 0o444 == 0o444, f
    md = (out / "TRAINING.md").read_text()
    assert "--smoke" in md and "| base + delta (alpha=1) |" in md


def test_smoke_training_is_deterministic(tmp_path):
    # same seed, same thread count: byte-identical weights, including the RL expert (sampled rollouts)
    for d in ("a", "b"):
        assert train.main(["--smoke", "--out", str(tmp_path / d), "--threads", "1"]) == 0
    for role in ("base", "expert_base", "expert"):
        a = (tmp_path / "a" / role / "model.safetensors").read_bytes()
        b = (tmp_path / "b" / role / "model.safetensors").read_bytes()
        assert a == b, role
    assert train.main(["--smoke", "--out", str(tmp_path / "c"), "--threads", "1", "--seed", "1"]) == 0
    assert (tmp_path / "c" / "base" / "model.safetensors").read_bytes() != (tmp_path / "a" / "base" / "model.safetensors").read_bytes()
