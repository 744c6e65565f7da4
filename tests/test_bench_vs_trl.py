"""The pure parts of `bench/vs_trl.py` and `bench/startup.py` (no engine, no TRL: the benchmark itself needs TRL's
venv, a minutes-long install, so it runs by hand, not in the suite).

- `never_eos` makes a model whose completions are exactly the cap long: EOS gets no probability at any position,
  whatever the input, and the model keeps its shapes (so vLLM and transformers load it alike).
- The steady-state numbers of every side leave out the warm-up steps the same way.
- The sweep's ratios are over TRL DistillationTrainer's sequences/s, onpolicy's best mode is the faster of
  sync/async, and a failed system is reported, not counted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_never_eos_leaves_eos_no_probability_at_any_position(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vs_trl_assets import never_eos

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64).eval()
    eos = tok.eos_token_id
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (4, model.config.max_position_embeddings), generator=g)
    with torch.no_grad():
        before = torch.log_softmax(model(ids).logits, -1)[..., eos]
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        worst = never_eos(model, eos)  # calibrated on its own probes (seed 0), checked here on others
        after = torch.log_softmax(model(ids).logits, -1)
    assert worst < -60
    assert before.max() > -20  # the random model could sample EOS (that is what the change is for)
    assert after[..., eos].max() < -90  # p(EOS) < 1e-39: zero in float32, at every position of every input
    assert torch.isfinite(after).all()
    others = torch.cat([after[..., :eos], after[..., eos + 1:]], -1).exp().sum(-1)
    assert torch.allclose(others, torch.ones_like(others), atol=1e-12)  # the rest is still a distribution
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_steady_state_leaves_out_the_warmup_steps():
    from vs_trl_onpolicy import steady_state

    records = [{"time": 10.0 * (i + 1), "sequences": 4, "sampled_tokens": 40 + i, "step_seconds": 9.0,
                "rollout_seconds": 1.0} for i in range(4)]
    s = steady_state(records, warmup=1)
    assert s["steps"] == 3 and s["sequences"] == 12 and s["sampled_tokens"] == 41 + 42 + 43
    assert s["interval_seconds"] == 30.0  # end of step 1 (t=10) to end of step 4 (t=40)
    assert s["phase_seconds"]["rollout"] == 3.0 and s["window_epochs"] == [10.0, 40.0]
    with pytest.raises(ValueError, match="raise --steps"):
        steady_state(records[:1], warmup=1)


def test_trl_runners_time_the_same_steps(tmp_path):
    import json

    from trl_common import write_result

    clock = SimpleNamespace(begin=0.0, step_ends=[5.0, 7.0, 9.5], begin_epoch=1000.0,
                            step_end_epochs=[1005.0, 1007.0, 1009.5])
    spec = {"warmup": 1, "result": str(tmp_path / "r.json"), "save_to": "s"}
    write_result(spec, clock, [(8, 64), (8, 64), (8, 60)], {"trainer": "x"})
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["steady"] == {"steps": 2, "sequences": 16, "sampled_tokens": 124, "interval_seconds": 4.5,
                           "window_epochs": [1005.0, 1009.5]}
    assert r["per_step_seconds"] == [5.0, 2.0, 2.5] and r["first_step_started_at"] == 1000.0
    with pytest.raises(SystemExit, match="need > 1 steps"):
        write_result(spec, clock, [(8, 64)], {})  # a step generated nothing the clock saw: refuse


def test_cpu_between_reads_the_steady_window_off_cumulative_samples():
    from vs_trl import cpu_between

    samples = [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (3.0, 4.5)]
    assert cpu_between(samples, 0.5, 2.5) == pytest.approx(4.25 - 1.5)
    assert cpu_between(samples, 2.0, 3.0) == pytest.approx(0.5)
    assert cpu_between(samples, 2.0, 9.0) is None  # the window ran past the last sample: unknown, not 0


def _case(length: int, rates: dict[str, float | None], floor_step: float = 1.0) -> dict:
    systems = {}
    for name, seq_s in rates.items():
        if seq_s is None:
            systems[name] = {"error": "exit 1\nAttributeError: 'Parameter' object has no attribute 'weight_loader'"}
        else:
            systems[name] = {"sequences_per_second": seq_s, "tokens_per_second": seq_s * length,
                             "seconds_per_step": (floor_step if name == "floor" else 8 / seq_s),
                             "tokens_per_sequence": float(length), "startup_seconds": 10.0, "process_seconds": 20.0,
                             "load_average_before": 0.5, "cpu_seconds_per_step": 2 * 8 / seq_s}
    return {"pair": {"name": "mid", "max_new_tokens": length, "prompts_per_step": 8}, "steps": 3,
            "warmup_steps_left_out": 1, "lr": 1e-4, "systems": systems}


def test_sweep_ratios_are_over_trl_and_best_is_the_faster_onpolicy_mode(tmp_path):
    from vs_trl_report import format_case, format_sweep, plot, sweep_rows

    report = {"cases": {"mid_8": _case(8, {"trl": 2.0, "trl_vllm": None, "gkd": 1.0, "sync": 1.5, "async": 3.0,
                                           "floor": 4.0}, floor_step=2.0),
                        "mid_1024": _case(1024, {"trl": 0.5, "sync": 0.75, "async": 0.6, "floor": 1.0})},
              "cpu_count": 2, "load_average_at_start": [0.5, 0.5, 0.5]}
    short, long = sweep_rows(report)
    assert (short["gkd"], short["sync"], short["async"], short["floor"]) == (0.5, 0.75, 1.5, 2.0)
    assert short["best"] == "async" and short["trl_vllm"] is None
    assert short["best_over_floor_step"] == pytest.approx((8 / 3.0) / 2.0)
    assert long["best"] == "sync" and long["sync"] == 1.5
    assert short["async_cpu"] == pytest.approx(2.0 / 3.0)  # CPU per step over TRL's
    text = format_case(report["cases"]["mid_8"])
    assert "weight_loader" in text  # a failed system shows why, and has no ratio
    assert "async" in format_sweep(report)
    plot(report, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 10_000
