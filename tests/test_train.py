"""The shared training loop: it learns, its bf16 path runs, and a seeded run repeats exactly."""

import torch
import torch.nn.functional as F

from minilab.batching import length_grouped_batches
from minilab.optim import linear_schedule, make_optimizer
from minilab.train import TrainConfig, train


def _problem(n=256, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 3, generator=g)
    y = (x @ w).argmax(-1)
    return x, y


def _run(precision="fp32", seed=0, steps=60):
    x, y = _problem()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 3))
    lengths = [1] * len(x)

    def make_batches(epoch):
        return length_grouped_batches(lengths, 16, seed=seed + epoch)

    def loss_fn(m, idx):
        logits = m(x[idx])
        return F.cross_entropy(logits.float(), y[idx]), {}

    def evaluate(m):
        return {"accuracy": (m(x).argmax(-1) == y).float().mean().item()}

    cfg = TrainConfig(max_steps=steps, lr=1e-2, precision=precision, seed=seed, eval_every=20, log_every=5, progress=False, grad_accum=2)
    res = train(model, make_batches, loss_fn, cfg, torch.device("cpu"), evaluate=evaluate)
    return model, res


def test_loss_falls_and_accuracy_rises():
    _, res = _run()
    losses = [h["loss"] for h in res.history if h["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert res.best_metric > 0.8
    assert res.steps == 60


def test_bf16_path_runs_and_learns():
    _, res = _run(precision="bf16")
    losses = [h["loss"] for h in res.history if h["kind"] == "train"]
    assert losses[-1] < losses[0]


def test_seeded_run_repeats_exactly():
    m1, r1 = _run(seed=3)
    m2, r2 = _run(seed=3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert [h.get("loss") for h in r1.history] == [h.get("loss") for h in r2.history]
    m3, _ = _run(seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


def test_best_dev_weights_are_restored():
    model, res = _run()
    x, y = _problem()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert abs(acc - res.best_metric) < 1e-6


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, 1e-3, 0.1)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[0].weight)] == 0.1
    assert decays[id(model[0].bias)] == 0.0 and decays[id(model[1].weight)] == 0.0


def test_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up: 1/4, 2/4, 3/4, 4/4; then (12-s)/8 for s = 4..11
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lrs[-1] == 1 / 8


def test_length_grouping_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 100, (2000,), generator=g).tolist()
    batches = length_grouped_batches(lengths, 32, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(2000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    naive = sum(len(b) * max(lengths[i] for i in b) for b in [list(range(i, min(i + 32, 2000))) for i in range(0, 2000, 32)])
    assert padded < 0.7 * naive


# --------------------------------------------------------------------------------------------
# Accumulation, the non-finite guard, best-on-dev restore, checkpoints and resume

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402

from minilab.checkpoint import Checkpointer  # noqa: E402
from minilab.train import NonFiniteError, Trainer, TrainingInterrupted  # noqa: E402


def _linear(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3))


def _xent(x, y):
    def loss_fn(m, idx):
        return F.cross_entropy(m(x[idx]), y[idx]), {}
    return loss_fn


def test_k_micro_batches_with_accumulation_k_equal_one_k_times_larger_batch():
    x, y = _problem(n=64)
    a, b = _linear(), _linear()
    micro = [list(range(i, i + 8)) for i in range(0, 32, 8)]  # 4 micro-batches of 8
    base = dict(max_steps=1, lr=1e-2, precision="fp32", progress=False, warmup_ratio=0.0, max_grad_norm=0.0)
    train(a, lambda e: micro, _xent(x, y), TrainConfig(grad_accum=4, **base), torch.device("cpu"))
    train(b, lambda e: [list(range(32))], _xent(x, y), TrainConfig(grad_accum=1, **base), torch.device("cpu"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # fp32 rounding of a sum of 4 vs one mean of 32
    assert not torch.equal(a[0].weight, _linear()[0].weight)  # and it did step


def test_leftover_micro_batches_form_a_last_smaller_step_each_used_once():
    x, y = _problem(n=40)
    seen = []
    batches = [list(range(i, i + 8)) for i in range(0, 40, 8)]  # 5 micro-batches per epoch

    def loss_fn(m, idx):
        seen.append(idx[0] // 8)
        return F.cross_entropy(m(x[idx]), y[idx]), {}

    model = _linear()
    cfg = TrainConfig(epochs=2, grad_accum=2, lr=0.0, precision="fp32", progress=False, log_every=1, max_grad_norm=0.0)
    t = Trainer(model, lambda e: batches, loss_fn, cfg, torch.device("cpu"))
    assert t.steps_per_epoch == 3 and t.total_steps == 6
    res = t.run()
    assert res.steps == 6 and seen == [0, 1, 2, 3, 4] * 2  # every micro-batch once per epoch, none carried over
    # lr 0: the weights never move, so each step's gradient norm can be recomputed by hand. The last
    # step of an epoch holds one micro-batch, and its loss is that batch's mean, not half of it.
    norms = [h["grad_norm"] for h in res.history if h["kind"] == "train"]

    def norm_of(idxs):
        model.zero_grad()
        sum(F.cross_entropy(model(x[i]), y[i]) for i in idxs).div(len(idxs)).backward()
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))

    expected = [norm_of([batches[0], batches[1]]), norm_of([batches[2], batches[3]]), norm_of([batches[4]])] * 2
    assert norms == pytest.approx(expected, rel=1e-5)


def test_accumulation_larger_than_an_epoch_still_steps_and_ends():
    x, y = _problem(n=16)
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("the loop did not end")))
    signal.alarm(60)
    try:
        res = train(_linear(), lambda e: [[0, 1, 2, 3], [4, 5, 6, 7]], _xent(x, y),
                    TrainConfig(epochs=3, grad_accum=8, precision="fp32", progress=False), torch.device("cpu"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert res.steps == 3  # one (2-micro-batch) step per epoch


def _nan_at(bad_steps, x, y):
    calls = {"n": 0}

    def loss_fn(m, idx):
        calls["n"] += 1
        loss = F.cross_entropy(m(x[idx]), y[idx])
        return (loss * float("nan") if calls["n"] in bad_steps else loss), {}
    return loss_fn


def test_nonfinite_steps_are_skipped_counted_and_weights_stay_finite():
    x, y = _problem()
    model = _linear()
    batches = [list(range(i, i + 16)) for i in range(0, 256, 16)]
    cfg = TrainConfig(max_steps=10, lr=1e-2, precision="fp32", progress=False, log_every=1)
    t = Trainer(model, lambda e: batches, _nan_at({3, 4, 7}, x, y), cfg, torch.device("cpu"))
    res = t.run()
    assert res.nonfinite_steps == 3 and res.steps == 10
    assert [h["step"] for h in res.history if h["kind"] == "skipped"] == [2, 3, 6]  # logged at the step before
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert t.scheduler.last_epoch == 7  # the schedule advanced only on the 7 real steps


def test_fp16_scaler_survives_a_skipped_step_and_lowers_its_scale():
    """fp16's gradient scaler (CUDA only in the loop; its CPU twin here, the same code) after a NaN loss:
    the skipped step must close the scaler's unscale_ with an update, or the next step's unscale_ raises
    "unscale_() has already been called" and the run dies at its first overflow."""
    x, y = _problem()
    batches = [list(range(i, i + 16)) for i in range(0, 256, 16)]
    cfg = TrainConfig(max_steps=6, lr=1e-2, precision="fp32", progress=False, log_every=1)
    t = Trainer(_linear(), lambda e: batches, _nan_at({3}, x, y), cfg, torch.device("cpu"))
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    res = t.run()
    assert res.steps == 6 and res.nonfinite_steps == 1
    assert t.scaler.get_scale() == 2.0**9  # halved once, for the NaN step; the other 5 steps kept it
    assert t.scheduler.last_epoch == 5


def test_three_nonfinite_steps_in_a_row_stop_the_run_with_one_line():
    x, y = _problem()
    batches = [list(range(i, i + 16)) for i in range(0, 256, 16)]
    cfg = TrainConfig(max_steps=10, lr=1e-2, precision="fp32", progress=False)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(the last at step 5, learning rate .*\).*lower --lr"):
        train(_linear(), lambda e: batches, _nan_at({3, 4, 5}, x, y), cfg, torch.device("cpu"))


def test_best_dev_weights_restored_when_dev_peaks_early():
    x, y = _problem()
    model = _linear()
    scores = iter([0.5, 0.9, 0.2, 0.1])  # best at the second evaluation (step 10), not the last
    snapshots = {}

    def evaluate(m):
        snapshots[len(snapshots)] = [p.detach().clone() for p in m.parameters()]
        return {"accuracy": next(scores)}

    cfg = TrainConfig(max_steps=20, lr=1e-2, precision="fp32", progress=False, eval_every=5)
    res = train(model, lambda e: [list(range(i, i + 16)) for i in range(0, 256, 16)], _xent(x, y), cfg,
                torch.device("cpu"), evaluate=evaluate)
    assert res.best_step == 10 and res.best_metric == 0.9
    for p, q in zip(model.parameters(), snapshots[1]):
        assert torch.equal(p, q)
    assert not torch.equal(next(model.parameters()), snapshots[3][0])


def _ckpt_run(tmp_path, interrupt_call=None, resume=False, config=None, dropout=0.1, steps=14, crash_call=None):
    """A run with dropout (so the RNG state matters), accumulation 2 over a 5-batch epoch (steps of
    2, 2 and 1 micro-batches, so checkpoints land mid-epoch), checkpoints every 3 steps; SIGTERM
    sent to itself during micro-batch number `interrupt_call`."""
    from minilab.tracking import Tracker

    x, y = _problem()
    model = _linear(dropout=dropout)
    batches = lambda e: length_grouped_batches([1] * 80, 16, seed=e)  # noqa: E731
    calls = {"n": 0}

    def loss_fn(m, idx):
        calls["n"] += 1
        if calls["n"] == crash_call:
            raise RuntimeError("lost machine")
        if calls["n"] == interrupt_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(m(x[idx]), y[idx]), {"x": float(idx[0])}

    ck = Checkpointer(tmp_path / "ck", config or {"lr": 1e-2}, save_every=3, resume=resume)
    tracker = Tracker(ck.metrics_log, config={"lr": 1e-2}, resume=ck.meta)
    cfg = TrainConfig(max_steps=steps, lr=1e-2, grad_accum=2, precision="fp32", progress=False, log_every=1, eval_every=4)
    evaluate = lambda m: {"accuracy": (m(x).argmax(-1) == y).float().mean().item()}  # noqa: E731
    res = Trainer(model, batches, loss_fn, cfg, torch.device("cpu"), evaluate, tracker, checkpointer=ck).run()
    tracker.finish()
    return model, res, ck


def _log_without_time(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "examples_per_second")}
            for line in path.read_text().splitlines()]


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref_model, ref, ref_ck = _ckpt_run(tmp_path / "a")
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 8: checkpoint saved"):
        _ckpt_run(tmp_path / "b", interrupt_call=13)  # micro-batch 13 = the first of step 8 (5 per 3 steps)
    assert (tmp_path / "b" / "ck" / "latest").read_text() == "step-000008"
    model, res, ck = _ckpt_run(tmp_path / "b", resume=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)  # bitwise
    assert res.steps == ref.steps and res.best_step == ref.best_step and res.best_metric == ref.best_metric
    assert _log_without_time(ck.metrics_log) == _log_without_time(ref_ck.metrics_log)


def test_resume_after_a_crash_between_checkpoints_drops_the_lines_logged_after_it(tmp_path):
    ref_model, _, ref_ck = _ckpt_run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="lost machine"):
        _ckpt_run(tmp_path / "b", crash_call=19)  # during step 11: the last checkpoint is step 9's
    ck_dir = tmp_path / "b" / "ck"
    assert (ck_dir / "latest").read_text() == "step-000009"
    assert _log_without_time(ck_dir / "metrics.jsonl")[-1]["step"] == 10  # the log ran on past it
    (ck_dir / ".tmp-step-000012-999").mkdir()  # and a half-written checkpoint, as a kill mid-save leaves
    (ck_dir / ".tmp-step-000012-999" / "trainer.json").write_text("{half")
    model, _, ck = _ckpt_run(tmp_path / "b", resume=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert _log_without_time(ck.metrics_log) == _log_without_time(ref_ck.metrics_log)
    assert not (ck_dir / ".tmp-step-000012-999").exists()  # cleaned up by the next save


def test_resume_with_a_changed_config_is_refused_by_name(tmp_path):
    _ckpt_run(tmp_path, steps=3)
    with pytest.raises(ValueError, match=r"from a different run \(lr: 0.01 -> 0.02; seed: None -> 1\)"):
        Checkpointer(tmp_path / "ck", {"lr": 2e-2, "seed": 1}, resume=True)


def test_epochs_on_the_command_line_override_the_presets_step_count():
    import argparse

    from minilab.options import add_train_args, train_config_from_args

    preset = {"epochs": 1, "max_steps": 400}
    p = argparse.ArgumentParser()
    add_train_args(p, **preset)
    assert train_config_from_args(p.parse_args([]), preset).max_steps == 400
    cfg = train_config_from_args(p.parse_args(["--epochs", "2"]), preset)
    assert cfg.max_steps is None and cfg.epochs == 2
    assert train_config_from_args(p.parse_args(["--epochs", "2", "--max-steps", "5"]), preset).max_steps == 5


def test_auto_precision_on_the_cpu_is_bf16_only_where_onednn_runs_bf16_matmuls(monkeypatch):
    """`--precision auto` on a CPU: bf16 autocast where PyTorch sends bf16 matmuls to oneDNN (AVX-512,
    AMX), plain fp32 where it has no such kernel (AVX2 only: bf16 5-20x slower there, not faster). An
    explicit --precision bf16 is obeyed on either, and the run's setup line says why auto chose fp32."""
    import minilab.precision as precision
    from minilab.precision import precision_note, resolve_precision

    cpu = torch.device("cpu")
    for fast, auto in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_precision("auto", cpu) == (auto, False)
        assert resolve_precision("bf16", cpu) == (torch.bfloat16, False)
        assert resolve_precision("fp32", cpu) == (None, False)
        note = precision_note("auto", cpu, auto)
        assert (note == "") == fast and ("" if fast else "no oneDNN bf16 matmul") in note
        assert precision_note("fp32", cpu, None) == ""  # asked for, nothing to explain
        cfg = TrainConfig(max_steps=1, precision="auto", progress=False)
        from minilab.train import Trainer

        trainer = Trainer(torch.nn.Linear(2, 2), lambda epoch: [], lambda m, b: (None, {}), cfg, cpu)
        assert trainer.amp_dtype == auto
