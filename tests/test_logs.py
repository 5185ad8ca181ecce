"""logs.py: the step line's ETA, curves.png's panels, the sinks' names. Fast: no model, no training run."""
import json
from types import SimpleNamespace

import torch

import logs
import reward
import train
from reward import Grade


def test_step_line_counts_steps_and_estimates_the_time_left(tmp_path, monkeypatch, capsys):
    """ETA = steps left x the mean wall time of this process's steps so far (here 30 s), also after a resume."""
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "time", lambda: clock[0])
    ro = SimpleNamespace(prompt_ids=[[1, 2]] * 2, finish_reason=["stop", "length"])
    tokenizer = SimpleNamespace(decode=lambda ids: "Q: 1 + 1?")
    grades = [Grade(1.0, "2", True, "ok", True), Grade(0.0, "", False, "ok", False)]
    m = dict(step=0, reward=0.5, len_mean=7, clip_ratio=0.5, kl=0.0, entropy=1.0, grad_norm=0.3, t_step=30,
             t_rollout=20, t_logprobs=1, t_update=9, peak_mem_gib=1.0)
    for start, steps, lines in [(0, 100, ["step 1/100 ", "| elapsed 30s | eta 49m30s"]),
                                (50, 100, ["step 51/100 ", "| elapsed 30s | eta 24m30s"])]:
        out = tmp_path / f"from{start}"
        out.mkdir()
        rec = logs.start(train.Config(out=str(out), steps=steps), start)
        clock[0] += 30
        rec.log_step(dict(m, step=start + 1), ro, ["\\boxed{2}", "so"], grades, [1.0, 0.0], ["2", "2"], tokenizer)
        printed = capsys.readouterr().out
        assert all(s in printed for s in lines), printed
    clock[0] += 2 * 3600 - 30  # this process's 2 steps took 2 h: 1 h each, 48 left
    rec.log_step(dict(m, step=52), ro, ["a", "b"], grades, [1.0, 0.0], ["2", "2"], tokenizer)
    assert "| elapsed 2h00m | eta 48h00m" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [51, 52]
    samples = [json.loads(l) for l in open(out / "samples.jsonl")]
    assert [(x["pred"], x["reward"], x["correct"]) for x in samples] == [("2", 1.0, True), ("", 0.0, False)] * 2
    assert [logs.duration(s) for s in (0, 59.9, 60, 3599, 3600, 86399)] == ["0s", "59s", "1m00s", "59m59s", "1h00m",
                                                                           "23h59m"]


def test_step_metrics_accuracy_counts_correct_and_reward_the_shaped_rewards():
    """Shaping on or off (reward.shaped_rewards), the step's accuracy is the same; its reward is the one trained on."""
    cfg = train.Config(samples_per_prompt=2)
    grades = [Grade(1.0, "2", True, "ok", True), Grade(0.0, "", False, "ok", False), Grade(1.0, "3", False, "ok", True),
              Grade(0.0, "4", True, "ok", False)]
    ro = SimpleNamespace(finish_reason=["stop", "length", "stop", "stop"], lengths=torch.tensor([3, 10, 9, 4]))
    sums = dict(pg=0.0, clipped=0.0, kl=0.0, entropy=0.0, tokens=0)
    row = lambda rewards: logs.step_metrics(cfg, 1, 0.5, ro, torch.tensor(rewards), grades, sums, [0.1], 0,
                                            [0, 1, 2, 3, 4], [5, 5, 5, 5], 0.0, torch.device("cpu"), 1e-6)
    off = row(reward.shaped_rewards(grades, ro.lengths.tolist(), 10))
    on = row(reward.shaped_rewards(grades, ro.lengths.tolist(), 10, overlong_buffer=4, format_reward=-0.5))
    assert off["accuracy"] == on["accuracy"] == 0.5 and off["reward"] == 0.5 != on["reward"]
    assert on["lr"] == 1e-6


def test_curves_have_the_training_panels_and_eval_accuracy(tmp_path):
    rows = [dict(step=s, reward=s / 10, len_mean=20 - s, len_max=30, clip_ratio=0.1, kl=1e-3 * s, entropy=1.0,
                 grad_norm=0.5, t_rollout=3.0, t_reward=0.1, t_logprobs=0.5, t_update=2.0) for s in range(1, 9)]
    for r in rows[3::4]:
        r["eval_math500"] = 10.0 * r["step"]  # --eval_every=4
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "rew')
    titles = logs.plot_run(str(tmp_path))
    assert titles == ["reward (mean)", "response length (tokens)", "clip ratio (cut at max length)",
                      "KL to reference (per token)", "entropy (per token)", "grad norm (before clipping)",
                      "seconds per step, by phase", "eval accuracy (%)"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert logs.series(rows, {"math500": "eval_math500", "max": "len_max"}) == {"math500": ([4, 8], [40.0, 80.0]),
                                                                               "max": ([*range(1, 9)], [30] * 8)}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if "eval_math500" not in r))
    assert "eval accuracy (%)" not in logs.plot_run(str(tmp_path))  # no --eval_every: no eval panel
    assert [logs.sink_tag(k) for k in ("reward", "t_update", "eval_math500")] == \
        ["train/reward", "train/t_update", "eval/math500"]


def test_step_metrics_against_hand_computed_values():
    """A handmade rollout of 4 groups of 2 whose counts all differ (responses 8, reward sum 4, correct 1,
    zero-variance groups 2, cut at max length 5, length sum 66, timeouts 3, errors 0), so two of them swapped would
    show; lr is the step's (a warmup's), not cfg.lr."""
    cfg = SimpleNamespace(samples_per_prompt=2, lr=1e-6, skip_zero_var=True, mask_truncated=True)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # groups (1, 1) and (0, 0) are zero-variance
    ro = SimpleNamespace(finish_reason=["length"] * 3 + ["stop"] + ["length"] * 2 + ["stop"] * 2,
                         lengths=torch.tensor([10, 10, 10, 3, 10, 10, 6, 7]))
    grades = [Grade(r.item(), "", True, s, i == 0)  # (one correct: the rewards trained on need not say it)
              for i, (r, s) in enumerate(zip(rewards, ["ok"] * 3 + ["timeout"] * 3 + ["ok"] * 2))]
    sums = dict(pg=2.0, clipped=3.0, kl=0.5, entropy=12.0, tokens=40)
    m = logs.step_metrics(cfg, 7, 1.23456, ro, rewards, grades, sums, [1.0, 3.0], 1, [100.0, 102.0, 103.0, 107.0, 115.0],
                          [20] * 8, 0.5, torch.device("cpu"), 2e-6)
    peak = m.pop("peak_mem_gib")  # this process's max RSS: at least the rollout's
    assert peak >= 0.5
    assert m == dict(step=7, epoch=1.2346, reward=4 / 8, accuracy=1 / 8, zero_var_groups=2 / 4, len_mean=66 / 8,
                     len_max=10, len_min=3, clip_ratio=5 / 8, pg_loss=2.0 / 40, clip_frac=3.0 / 40, kl=0.5 / 40,
                     entropy=12.0 / 40, grad_norm=2.0, lr=2e-6, skipped_updates=1, skipped_groups=2, masked_responses=5,
                     grade_timeouts=3, grade_errors=0, t_rollout=2.0, t_reward=1.0, t_logprobs=4.0, t_update=8.0,
                     t_step=15.0, gen_tok_s=66 / 2.0, train_tok_s=160 / 8.0, peak_mem_rollout_gib=0.5)
