"""Tests for tasks.py and experiments.py: each task's checker against brute force over whole answer spaces,
the tuning / evaluation / training split, the tables' frontier and intervals against their definitions,
and every measurement command end to end on the shipped models."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import boe
import experiments
import tasks


def brute_force_answers(task, prompt):
    """Every filling of the prompt's [MASK] positions with the task's answer tokens, [N, L]."""
    holes = torch.nonzero(prompt == task.model_cfg.mask_id).flatten()
    values = {"marks": [boe.UNMARKED, boe.MARKED], "sudoku": range(4), "latin": range(4),
              "countdown": range(tasks.CD_MINUS + 1)}[task.name]
    fillings = torch.tensor(list(itertools.product(values, repeat=len(holes))))  # [N, holes]
    answers = prompt.repeat(len(fillings), 1)  # [N, L]
    answers[:, holes] = fillings
    if task.name == "marks":  # the pivot takes a cell number, not a mark
        answers = answers.repeat(boe.N_CELLS, 1)
        answers[:, -1] = torch.arange(boe.N_CELLS).repeat_interleave(len(fillings))
    return answers


@pytest.mark.parametrize("name", list(tasks.ALL_TASKS))
def test_checker_accepts_exactly_the_brute_force_solutions(name):
    task = tasks.ALL_TASKS[name]
    prompts, answers = task.make_instances(3, seed=5)
    if name in ("sudoku", "latin"):  # 4^10 or 4^12 fillings are too many: keep 6 or 8 holes
        for prompt, answer in zip(prompts, answers):
            holes = torch.nonzero(prompt == task.model_cfg.mask_id).flatten()[:4]
            prompt[holes] = answer[holes]
    for prompt, answer in zip(prompts, answers):
        candidates = brute_force_answers(task, prompt)  # [N, L]
        accepted = candidates[task.check(prompt.expand_as(candidates), candidates)]  # [S, L]
        want = {tuple(row) for row in task.solutions(prompt).tolist()}
        assert {tuple(row) for row in accepted.tolist()} == want and tuple(answer.tolist()) in want
        assert len(want) >= 1 and len(accepted) < len(candidates)


@pytest.mark.parametrize("name", list(tasks.ALL_TASKS))
def test_checker_rejects_every_near_miss(name):
    # One token of a valid answer changed to any other id: never valid unless it is another solution.
    task = tasks.ALL_TASKS[name]
    prompts, answers = task.make_instances(20, seed=6)
    for prompt, answer in zip(prompts, answers):
        solutions = {tuple(row) for row in task.solutions(prompt).tolist()}
        for position in torch.nonzero(prompt == task.model_cfg.mask_id).flatten().tolist():
            for token in range(task.model_cfg.vocab_size):
                if token != answer[position]:
                    miss = answer.clone()
                    miss[position] = token
                    assert bool(task.check(prompt[None], miss[None])[0]) == (tuple(miss.tolist()) in solutions)
        assert not task.check(prompt[None], prompt[None])[0], "an unanswered prompt is not valid"


@pytest.mark.parametrize("name", list(tasks.ALL_TASKS))
def test_checker_rejects_a_valid_answer_whose_prompt_was_changed(name):
    # An answer must keep its prompt: one given token changed to any other id is rejected, however
    # valid the rest would be for the changed prompt.
    task = tasks.ALL_TASKS[name]
    prompts, answers = task.make_instances(10, seed=6)
    for prompt, answer in zip(prompts, answers):
        for position in torch.nonzero(prompt != task.model_cfg.mask_id).flatten().tolist():
            misses = answer.repeat(task.model_cfg.vocab_size, 1)  # [V, L]
            misses[:, position] = torch.arange(task.model_cfg.vocab_size)
            misses = misses[misses[:, position] != answer[position]]  # [V-1, L]
            assert not task.check(prompt.expand_as(misses), misses).any()


@pytest.mark.parametrize("name", ["sudoku", "latin"])
def test_grid_checker_accepts_of_all_valid_grids_exactly_those_that_keep_the_givens(name):
    # Two valid grids differ in four cells or more, which no one-token near-miss reaches: compare the
    # checker on every valid grid of the task with the grids that agree with the puzzle's given cells.
    task = tasks.ALL_TASKS[name]
    grids = tasks.GRIDS if name == "sudoku" else tasks.SQUARES  # [N, 16] every valid grid
    prompts, _ = task.make_instances(10, seed=6)
    for prompt in prompts:
        accepted = grids[task.check(prompt.expand_as(grids), grids)]  # [S, 16]
        keeps = grids[((grids == prompt) | (prompt == task.model_cfg.mask_id)).all(1)]  # [S, 16]
        assert {tuple(row) for row in accepted.tolist()} == {tuple(row) for row in keeps.tolist()}
        assert 1 <= len(accepted) < len(grids)


def test_evaluate_charges_each_backward_at_the_backward_price(monkeypatch):
    record = dict(forwards=torch.tensor([3, 5]), backwards=torch.tensor([1, 2]), wall_s=0.0)
    monkeypatch.setattr(boe, "generate", lambda *args, **kwargs: (torch.zeros(2, 18, dtype=torch.long), record))
    prompts = torch.zeros(2, 18, dtype=torch.long)
    row = experiments.evaluate(None, prompts, "rule", "setting", "boe", 3, boe.SamplerConfig(),
                               solved_fn=lambda tokens: torch.tensor([True, False]))
    assert (row["accuracy"], row["forwards"], row["backwards"]) == (0.5, 4.0, 1.5)
    assert row["fwd_equiv"] == 4.0 + experiments.BACKWARD_COST * 1.5
    priced = experiments.evaluate(None, prompts, "rule", "setting", "boe", 3, boe.SamplerConfig(),
                                  solved_fn=lambda tokens: torch.tensor([True, False]), backward_cost=10.0)
    assert priced["fwd_equiv"] == 19.0


def test_sudoku_puzzles_have_one_solution_on_a_grid_training_never_sees():
    assert len(tasks.GRIDS) == 288 and bool(tasks.sudoku_valid(tasks.GRIDS).all())
    train = {tuple(g) for g in tasks.TRAIN_GRIDS.tolist()}
    for seed in (0, 1):
        prompts, answers = tasks.SUDOKU.make_instances(200, seed)
        assert ((prompts == tasks.SUDOKU_MASK).sum(1) == tasks.SUDOKU_HOLES).all()
        assert all(len(tasks.sudoku_solutions(p)) == 1 for p in prompts)
        assert not {tuple(a) for a in answers.tolist()} & train
    for seed in (-1, -2999):
        prompts, answers = tasks.SUDOKU.training_batch(128, seed)
        assert (prompts == tasks.SUDOKU_MASK).all() and {tuple(a) for a in answers.tolist()} <= train


def test_countdown_evaluation_prompts_never_reach_training_or_tuning():
    def keys(prompts):
        return {(tuple(sorted(p[:3])), p[4]) for p in prompts.tolist()}
    # Seed 0 draws from the tuning half of the held-out prompts, every other seed from the evaluation half.
    tuning = keys(tasks.COUNTDOWN.make_instances(1000, 0)[0])
    evaluation = keys(tasks.COUNTDOWN.make_instances(1000, 1)[0]) | keys(tasks.COUNTDOWN.make_instances(1000, 2)[0])
    assert tuning and evaluation and not tuning & evaluation
    assert {(numbers, target - tasks.CD_TARGET0) for numbers, target in tuning} <= tasks.CD_TUNING_KEYS
    held_out = evaluation | tuning
    for seed in (-1, -2999):
        prompts, answers = tasks.COUNTDOWN.training_batch(128, seed)
        assert not keys(prompts) & held_out
        assert tasks.countdown_check(prompts, answers).all()


def test_latin_puzzles_leave_several_completions_and_training_sees_whole_squares():
    assert len(tasks.SQUARES) == 576 and bool(tasks.latin_valid(tasks.SQUARES).all())
    prompts, answers = tasks.LATIN.make_instances(200, 1)
    assert ((prompts == tasks.LATIN_MASK).sum(1) == tasks.LATIN_HOLES).all() and tasks.LATIN.check(prompts, answers).all()
    completions = torch.tensor([len(tasks.latin_solutions(p)) for p in prompts]).float()  # [200]
    assert 4 < completions.mean() < 8 and (completions > 1).float().mean() > 0.9
    prompts, answers = tasks.LATIN.training_batch(128, -1)
    assert (prompts == tasks.LATIN_MASK).all() and tasks.latin_valid(answers).all()


@pytest.mark.parametrize("name", list(tasks.ALL_TASKS))
def test_tuning_and_evaluation_instances_differ_and_repeat(name):
    task = tasks.ALL_TASKS[name]
    tuning, _ = task.make_instances(50, 0)
    evaluation, _ = task.make_instances(50, 1)
    assert torch.equal(evaluation, task.make_instances(50, 1)[0])
    assert not torch.equal(tuning, evaluation)
    assert tuning.shape[1] == task.model_cfg.seq_len and int(tuning.max()) < task.model_cfg.vocab_size


def test_completable_says_whether_a_valid_answer_agrees_with_the_revealed_tokens():
    prompts, answers = boe.make_instances(20, 0)
    prompts, answers = prompts[:3], answers[:3]
    state = prompts.clone()
    state[:, -1] = answers[:, -1]  # the pivot of a valid answer
    assert tasks.completable(tasks.MARKS, prompts, state).all()
    other = (answers[:, -1] + 1) % boe.N_CELLS  # [3] another cell than the pivot names
    state[torch.arange(3), boe.PROMPT_LEN + other] = boe.MARKED  # marked against the pivot: no answer left
    assert not tasks.completable(tasks.MARKS, prompts, state).any()


def test_completions_count_the_valid_answers_that_agree_with_the_revealed_tokens():
    # A built-in prompt has one valid answer per open cell; a revealed pivot leaves one, a '-' on an open
    # cell one fewer, and a '*' against the pivot none.
    prompts, answers = boe.make_instances(20, 0)  # [20, L]
    n_open = (prompts[:, : boe.N_CELLS] == boe.OPEN).sum(1)  # [20]
    assert torch.equal(tasks.completions(tasks.MARKS, prompts, prompts), n_open)
    pivot = prompts.clone()
    pivot[:, -1] = answers[:, -1]
    assert (tasks.completions(tasks.MARKS, prompts, pivot) == 1).all()
    unmarked = prompts.clone()  # [20, L]
    unmarked[:, boe.PROMPT_LEN:-1] = torch.where(prompts[:, : boe.N_CELLS] == boe.OPEN, boe.MASK, boe.UNMARKED)
    cell = (prompts[:, : boe.N_CELLS] == boe.OPEN).int().argmax(1)  # [20] the first open cell
    unmarked[torch.arange(20), boe.PROMPT_LEN + cell] = boe.UNMARKED
    assert torch.equal(tasks.completions(tasks.MARKS, prompts, unmarked), n_open - 1)


def test_corrupt_cache_is_retrained_with_a_message(tmp_path, capsys):
    cache = tmp_path / "model.pt"
    cache.write_bytes(b"not a checkpoint")
    model_cfg, train_cfg = boe.ModelConfig(n_layer=1, d_model=16), boe.TrainConfig(steps=2, batch_size=8, cache=str(cache))
    model = experiments.load_or_train(model_cfg, train_cfg)
    assert "could not be loaded" in capsys.readouterr().out
    reloaded = experiments.load_or_train(model_cfg, train_cfg)  # now a valid cache: loaded, not retrained
    assert "train step" not in capsys.readouterr().out
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_of_other_settings_is_retrained_and_retrain_trains_a_valid_one(tmp_path, capsys):
    # Weights are reused only where every setting that made them matches: here the training steps differ.
    cache = str(tmp_path / "model.pt")
    model_cfg = boe.ModelConfig(n_layer=1, d_model=16)
    experiments.load_or_train(model_cfg, boe.TrainConfig(steps=2, batch_size=8, cache=cache))
    capsys.readouterr()
    longer = boe.TrainConfig(steps=3, batch_size=8, cache=cache)
    experiments.load_or_train(model_cfg, longer)
    out = capsys.readouterr().out
    assert "was trained with other settings; retraining" in out and "train step     3/3" in out
    assert torch.load(cache, weights_only=True)["configs"]["train"]["steps"] == 3
    experiments.load_or_train(model_cfg, longer, retrain=True)  # valid, but asked to retrain
    assert "train step     3/3" in capsys.readouterr().out


def run(*args, timeout=600):
    """The stdout of `python experiments.py *args`, run as a user runs it (no TRITON_INTERPRET)."""
    return run_each(args, timeout=timeout)[0]


def run_each(*commands, timeout=600):
    """The stdout of each command of experiments.py, run one after the other in one fresh Python (imports once)
    as a user runs them: no TRITON_INTERPRET, and the shipped weights load rather than retrain."""
    script = ("import contextlib, io, json, sys, experiments\n"
              "outputs = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    sys.argv, out = ['experiments.py', *argv], io.StringIO()\n"
              "    with contextlib.redirect_stdout(out):\n"
              "        experiments.main()\n"
              "    outputs.append(out.getvalue())\n"
              "print(json.dumps(outputs))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    assert not any("train step" in out for out in outputs), "the shipped weights should load, not be retrained"
    return outputs


@pytest.mark.parametrize("paper", [False, True])
def test_every_rule_of_the_table_commits_at_the_temperature_asked(paper):
    rows = experiments.rule_rows([2, 3], 9, paper, temperature=0.5)
    assert {cfg.temperature for *_, cfg in rows} == {0.5}
    assert any(cfg.linearize == "surrogate" for *_, cfg in rows)  # the paper's BoE is among them


def test_frontier_is_every_row_no_cheaper_row_matches_in_accuracy():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        # Coarse values, so that ties in cost and in accuracy are common.
        costs = torch.randint(1, 5, (n,), generator=gen).tolist()
        accuracies = (torch.randint(0, 4, (n,), generator=gen) / 4).tolist()
        rows = [dict(rule=str(i), setting="", fwd_equiv=c, accuracy=a) for i, (c, a) in enumerate(zip(costs, accuracies))]
        # The definition, by brute force: a row is on the frontier when every other row that costs at most as
        # much is less accurate; among rows equal in cost and accuracy, the first in sorted order counts.
        expected = set()
        for i, row in enumerate(rows):
            rivals = [other for j, other in enumerate(rows) if j != i and other["fwd_equiv"] <= row["fwd_equiv"]]
            beaten = any(other["accuracy"] > row["accuracy"] or (other["accuracy"] == row["accuracy"] and (
                other["fwd_equiv"] < row["fwd_equiv"] or int(other["rule"]) < i)) for other in rivals)
            if not beaten:
                expected.add((row["rule"], ""))
        assert experiments.frontier(rows) == expected


@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (10, 10), (500, 1000), (1, 2), (3000, 3000), (0, 3000)])
def test_wilson_interval_holds_the_proportions_a_binomial_test_does_not_reject(successes, n):
    # The Wilson interval is {p : |successes/n - p| <= 1.96 sqrt(p (1 - p) / n)}: check it on a fine grid.
    low, high = experiments.wilson_interval(successes, n)
    assert low <= successes / n <= high
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    inside = (successes / n - grid).abs() <= 1.96 * (grid * (1 - grid) / n).sqrt()
    assert low == pytest.approx(grid[inside].min().item(), abs=1e-5)
    assert high == pytest.approx(grid[inside].max().item(), abs=1e-5)


def test_pooled_interval_counts_instances_the_models_agree_on_once():
    # Models that agree on every instance add no trials: Wilson at N. Models whose outcomes are as spread as
    # independent ones (var of the per-instance mean = p (1 - p) / M): Wilson at M N.
    agree = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)
    assert experiments.pooled_interval(agree) == pytest.approx(experiments.wilson_interval(3, 5))
    spread = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)  # m = 1, 1/2, 1/2, 0: var 1/8
    assert experiments.pooled_interval(spread) == pytest.approx(experiments.wilson_interval(4, 8))
    assert experiments.pooled_interval(torch.ones(3, 10, dtype=torch.bool)) == experiments.wilson_interval(10, 10)


def test_pooled_interval_covers_the_mean_model_where_counting_every_decoding_does_not():
    # 3 models on instances of random difficulty d ~ Beta(1/2, 1/2), each solving one with probability d: the
    # mean model's accuracy is E[d] = 1/2. About 95 % of the intervals must hold it; Wilson over all M N
    # decodings as if independent holds it far less often (the design effect here is 2).
    gen = torch.Generator().manual_seed(0)
    covered, naive = 0, 0
    runs, models, n = 400, 3, 200
    for _ in range(runs):
        difficulty = (math.pi / 2 * torch.rand(n, generator=gen)).sin() ** 2  # [N] Beta(1/2, 1/2): the arcsine law
        solved = torch.rand(models, n, generator=gen) < difficulty  # [M, N]
        low, high = experiments.pooled_interval(solved)
        covered += low <= 0.5 <= high
        low, high = experiments.wilson_interval(int(solved.sum()), models * n)
        naive += low <= 0.5 <= high
    assert 0.92 <= covered / runs <= 0.98 and naive / runs < 0.9, (covered / runs, naive / runs)


def test_lookahead_candidates_rank_above_every_other_position_however_large_their_costs(monkeypatch):
    # The searched candidates must rank above the rest whatever their costs: a fixed offset fails once
    # costs reach it. Costs far beyond any entropy sum are made up here.
    monkeypatch.setattr(experiments, "lookahead_costs", lambda s, positions, valid, counted=None, own_entropy=True:
                        torch.tensor([[3e4, 5e4]]).expand(positions.shape).where(valid, math.inf))
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.5]])[..., None].expand(1, 5, 2).clone()  # [1, 5, 2]
    probs[..., 1] = 1 - probs[..., 0]  # confidence max(p, 1 - p): 0.9, 0.8, 0.7, 0.9, 0.5
    s = boe.Step(None, torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool), probs,
                 torch.tensor([1]), 1.0, boe.SamplerConfig(), [], torch.zeros(1, dtype=torch.long))
    ranked = experiments.lookahead(k=2)(s).argsort(1, descending=True)[0].tolist()  # [5]
    assert ranked == [0, 3, 1, 2, 4]  # the two most confident by cost (lower first), then the rest by confidence


class TrueConditionals(torch.nn.Module):
    """The built-in task's true conditionals as a model: a hand-made predictor that stands in for a
    perfectly trained one."""
    mask_id = boe.MASK
    cfg = boe.ModelConfig()

    def forward(self, tokens):
        B, L = tokens.shape
        logits = torch.full((B, L, boe.MASK + 1), -1e9)  # [B, L, V]
        for b in range(B):
            cells, marks, pivot = tokens[b, :8], tokens[b, 9:17], tokens[b, 17]
            if pivot != boe.MASK:  # the marked cell is known
                options = [int(pivot)]
            elif (marks == boe.MARKED).any():
                options = [int((marks == boe.MARKED).nonzero()[0])]
            else:  # any open cell whose mark is still masked, equally likely
                options = [i for i in range(8) if cells[i] == boe.OPEN and marks[i] == boe.MASK]
            for j in range(8):
                p_marked = options.count(j) / len(options)
                logits[b, 9 + j, boe.UNMARKED] = math.log(max(1 - p_marked, 1e-30))
                logits[b, 9 + j, boe.MARKED] = math.log(max(p_marked, 1e-30))
            logits[b, 17, options] = 0.0
        return logits


def test_lookahead_reveals_the_pivot_first_under_the_true_conditionals():
    """On the task the pivot settles every mark: an exact lookahead with exact probabilities must
    reveal it in the first step, and confidence, which reveals it last, fails with two steps."""
    prompts, _ = boe.make_instances(3, 0)
    tokens, record = boe.generate(TrueConditionals(), prompts, 3, experiments.lookahead())
    assert (record["reveal_step"][:, 17] == 0).all(), "the pivot should be revealed first"
    tokens, _ = boe.generate(TrueConditionals(), prompts, 2, "confidence")
    assert not boe.check(tokens).any(), "confidence commits the last bits and the pivot together"


def test_exact_pick_reveals_the_pivot_where_a_pick_pays_and_charges_no_search():
    """Under the true conditionals the entropy bound reveals the blocked marks and one open mark, then is
    stuck (at once where no cell is blocked); the reveal that settles every other token there is the
    pivot. The exact pick makes it exactly where adaptive BoE would pick (5 or more open cells: enough
    positions masked for a pick to pay), and the decoding is charged its own forwards only."""
    prompts, _ = boe.make_instances(40, 0)
    picks = torch.zeros(40, dtype=torch.long)  # [n]
    rule = experiments.exact_pick_adaptive(boe.SamplerConfig(), picks)
    tokens, record = boe.generate(TrueConditionals(), prompts, boe.SEQ_LEN - boe.PROMPT_LEN, rule)
    n_open = (prompts[:, : boe.N_CELLS] == boe.OPEN).sum(1)  # [n]
    pays = n_open >= 5  # [n]
    stuck_step = (n_open < boe.N_CELLS).long()  # [n]
    assert pays.any() and not pays.all() and (n_open == boe.N_CELLS).any()
    assert boe.check(tokens).all()
    assert torch.equal(picks, pays.long())
    assert torch.equal(record["reveal_step"][pays, -1], stuck_step[pays]), "the pivot, at the stuck step"
    assert torch.equal(record["forwards"][pays], stuck_step[pays] + 2)
    assert torch.equal(record["forwards"], record["reveal_step"].amax(1) + 1)


@pytest.mark.parametrize("k", [-1, 2.0, True])
def test_lookahead_with_a_bad_k_gets_a_clear_error(k):
    with pytest.raises(ValueError, match="lookahead k must be"):
        experiments.lookahead(k=k)


def test_suite_quick_runs_every_rule_on_every_task():
    out = run("suite", "--quick")
    for name in tasks.ALL_TASKS:
        assert f"\n{name} (" in out
    for rule in (*boe.ORDERS, "lookahead"):
        assert f"\n{rule} " in out
    assert "BoE against confidence (fixed schedule)" in out and "\n  boe-adaptive  gamma 0.1" in out


def test_measurement_commands_run_on_the_shipped_models():
    tuned, picked, fidelity, ablations, shown, timed, loss, precision, noise = run_each(
        ["tune", "--instances", "4"], ["picks", "--instances", "10"], ["fidelity", "--instances", "6"],
        ["ablations", "--instances", "10"], ["show", "0", "--task", "countdown", "--steps", "2"],
        ["time-backward", "--instances", "16"], ["loss", "--instances", "100"], ["precision", "--instances", "10"],
        ["noise", "--instances", "10"])
    assert "boe: mean accuracy over tasks (marks, sudoku, countdown)" in tuned and "adaptive_pick=" in tuned
    assert "BoE wrong" in picked and "first pick on marks" in picked and "seed 2" in picked and "bound alone" in picked
    assert "the exact pick" in picked and "share gone" in picked and "answers: before" in picked
    assert "estimate vs lookahead" in fidelity
    assert "boe (paper, rho=1/2)" in ablations
    assert "boe-adaptive:" in shown and "step 1:" in shown
    assert "active rows" in timed
    assert "floor:" in loss
    assert "bfloat16" in precision.splitlines()[1]
    assert "s = 1e-06" in noise and "boe-adaptive gamma 0.1" in noise and "latin" in noise


def test_suite_quick_and_picks_decode_with_the_models_of_the_training_seeds_asked_for():
    suite, picked = run_each(["suite", "--quick", "--tasks", "marks", "--train-seeds", "2", "0"],
                             ["picks", "--instances", "10", "--train-seed", "1"])
    assert "marks, model seed 2:" in suite and "model seed 0" not in suite
    assert "seed-1 models" in picked and "seed-0" not in picked


def test_suite_plot_writes_a_png_per_task(tmp_path):
    pytest.importorskip("matplotlib")
    run("suite", "--quick", "--tasks", "marks", "--plot", str(tmp_path))
    assert (tmp_path / "frontier-marks.png").stat().st_size > 1000


def refusal(monkeypatch, capsys, *argv):
    """experiments.py's command line run in this process with `argv`, expecting a refusal before any work:
    argparse's exit status 2 and nothing on stdout. Returns stderr, for the message."""
    monkeypatch.setattr(sys, "argv", ["experiments.py", *argv])
    with pytest.raises(SystemExit) as stop:
        experiments.main()
    out = capsys.readouterr()
    assert stop.value.code == 2 and not out.out, out.err
    return out.err


def test_suite_outputs_that_cannot_be_written_fail_before_the_run(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"  # a file where the path wants a folder: unwritable, even for root
    blocker.write_text("")
    for option in ("--json", "--plot"):
        assert "cannot write" in refusal(monkeypatch, capsys, "suite", option, str(blocker / "out"))


def test_suite_plot_without_matplotlib_fails_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert "--plot needs matplotlib" in refusal(monkeypatch, capsys, "suite", "--plot", str(tmp_path))


@pytest.mark.parametrize("argv, message", [(["picks", "--instances", "0"], "must be >= 1"),
                                           (["show", "-1"], "INSTANCE >= 0"),
                                           (["fidelity", "--instances", str(10**4 + 1)], "at most 10**4"),
                                           (["show", str(10**20)], "INSTANCE must be below 10**6"),
                                           (["suite", "--json", ""], "need a path"),
                                           (["suite", "--plot", ""], "need a path"),
                                           (["suite", "--train-seeds", "0", "-1"], "seeds must be in [0, 10**12)"),
                                           (["train", "--train-seeds", str(10**12)], "seeds must be in [0, 10**12)"),
                                           (["picks", "--train-seed", "-1"], "seeds must be in [0, 10**12)")])
def test_commands_reject_instance_counts_out_of_range_before_the_run(monkeypatch, capsys, argv, message):
    assert message in refusal(monkeypatch, capsys, *argv)


@pytest.mark.parametrize("temperature", ["-0.5", "1e-45"])  # 1e-45 is 0 in float32, which would divide by it
def test_suite_rejects_a_bad_temperature_before_the_run(monkeypatch, capsys, temperature):
    assert "--temperature must be" in refusal(monkeypatch, capsys, "suite", "--temperature", temperature)


def test_an_output_path_is_checked_itself_and_an_existing_file_is_left_as_it_is(tmp_path):
    blocker = tmp_path / "a-file"  # a file where a path wants a folder: unwritable, even for root
    blocker.write_text("")
    link = tmp_path / "link.json"
    link.symlink_to(blocker / "out.json")  # a link to a place that cannot be written
    with pytest.raises(OSError, match="cannot write"):
        experiments.check_writable(str(link))
    kept = tmp_path / "kept.json"
    kept.write_text("keep")
    experiments.check_writable(str(kept))
    experiments.check_writable(str(tmp_path / "new.json"))
    assert kept.read_text() == "keep" and not (tmp_path / "new.json").exists()


# The pieces behind the tables, each against what it is defined to compute


def tiny_step(budget):
    """A Step of two fully masked built-in prompts on a tiny random model, with the given budgets [2]."""
    torch.manual_seed(0)
    model = boe.MaskedDiffusionTransformer(boe.ModelConfig(n_layer=1, d_model=16)).eval()
    prompts, _ = boe.make_instances(2, 0)
    with torch.no_grad():
        _, probs = boe.predict(model, prompts)
    masked = prompts == boe.MASK
    return boe.Step(model, prompts, masked, probs, torch.tensor(budget), 1.0, boe.SamplerConfig(), [],
                    torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("own_entropy", [True, False])
def test_lookahead_costs_are_own_entropy_plus_entropy_left_and_charge_one_forward_each(own_entropy):
    s = tiny_step([1, 1])
    positions = torch.arange(boe.PROMPT_LEN, boe.SEQ_LEN).expand(2, -1).contiguous()  # [2, 9] every masked one
    valid = torch.ones_like(positions, dtype=torch.bool)
    valid[1, 4:] = False  # row 1 searches 4 candidates only
    costs = experiments.lookahead_costs(s, positions, valid, own_entropy=own_entropy)
    own = boe.entropy(s.probs)
    for b in range(2):
        for k in range(positions.shape[1]):
            if not valid[b, k]:
                assert costs[b, k] == math.inf
                continue
            i = int(positions[b, k])
            trial = s.tokens[b:b + 1].clone()
            trial[0, i] = s.probs[b, i].argmax()
            with torch.no_grad():
                after = boe.entropy(boe.predict(s.model, trial)[1])[0]
            others = s.masked[b].clone()
            others[i] = False
            want = float((after * others).sum()) + (float(own[b, i]) if own_entropy else 0.0)
            assert float(costs[b, k]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert s.forwards.tolist() == [9, 4]


def test_lookahead_searches_at_least_the_budget_and_nothing_where_the_row_reveals_all_it_has():
    s = tiny_step([3, 9])  # row 0: budget 3 of 9 masked; row 1: reveals all 9 it has left
    scores = experiments.lookahead(k=1)(s)
    assert s.forwards.tolist() == [3, 0], "k=1 < budget 3 searches 3 candidates; a row revealing all searches none"
    assert scores.shape == (2, boe.SEQ_LEN)


def test_pooled_interval_counts_at_most_every_decoding():
    # Models that disagree everywhere (more spread than independent): n_eff is capped at M N.
    opposite = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert experiments.pooled_interval(opposite) == pytest.approx(experiments.wilson_interval(4, 8))
    anti = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)  # m = 2/3,2/3,2/3,1/3
    assert experiments.pooled_interval(anti) == pytest.approx(experiments.wilson_interval(7, 12))


def test_pooled_averages_each_number_over_the_models():
    rows = [dict(rule="r", setting="s", accuracy=a, forwards=f, backwards=b, fwd_equiv=e, solved=sv)
            for a, f, b, e, sv in ((0.5, 2.0, 1.0, 4.0, "1100"), (0.25, 4.0, 0.0, 4.0, "1000"))]
    row = experiments.pooled(rows)
    assert (row["accuracy"], row["low"], row["high"]) == (0.375, 0.25, 0.5)
    assert (row["forwards"], row["backwards"], row["fwd_equiv"]) == (3.0, 0.5, 4.0)
    assert row["ci95"] == experiments.pooled_interval(torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool))


def test_comparisons_mark_boe_better_or_worse_only_where_the_intervals_are_apart(capsys):
    pairs = (((0.5, 0.6), (0.3, 0.4)), ((0.3, 0.4), (0.5, 0.6)), ((0.4, 0.6), (0.3, 0.4)), ((0.3, 0.5), (0.4, 0.6)))
    assert [experiments.apart(*pair) for pair in pairs] == ["+", "-", "=", "="]  # touching is not apart

    def rows(rule, setting, *solved):  # one row per model, 40 instances each
        return [dict(rule=rule, setting=setting, accuracy=s.count("1") / len(s), forwards=1.0, backwards=0.0,
                     fwd_equiv=1.0, ci95=experiments.wilson_interval(s.count("1"), len(s)), solved=s) for s in solved]

    good, poor, half = "1" * 38 + "00", "1" * 4 + "0" * 36, "10" * 20
    by_rule = {("boe", "2 steps"): rows("boe", "2 steps", good, half), ("confidence", "2 steps"):
               rows("confidence", "2 steps", poor, half), ("boe-adaptive", "gamma 0.1"):
               rows("boe-adaptive", "gamma 0.1", poor, poor), ("entropy-bound", "gamma 0.1"):
               rows("entropy-bound", "gamma 0.1", good, good), ("random", "2 steps"): rows("random", "2 steps", poor)}
    experiments.print_comparisons(by_rule)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split() for line in lines] == [["boe", "2", "steps", "+", "+", "="],
                                                ["boe-adaptive", "gamma", "0.1", "-", "-", "-"]]


def test_evaluate_interval_is_wilson_of_the_solved_count(monkeypatch):
    record = dict(forwards=torch.tensor([3, 5, 1]), backwards=torch.tensor([0, 0, 0]), wall_s=0.0)
    monkeypatch.setattr(boe, "generate", lambda *a, **k: (torch.zeros(3, 18, dtype=torch.long), record))
    row = experiments.evaluate(None, torch.zeros(3, 18, dtype=torch.long), "r", "s", "boe", 3, boe.SamplerConfig(),
                               solved_fn=lambda tokens: torch.tensor([True, False, False]))
    assert row["ci95"] == experiments.wilson_interval(1, 3)


@pytest.mark.parametrize("name, holes", [("marks", 9), ("sudoku", 10), ("countdown", 5), ("latin", 12)])
def test_answer_length_is_the_most_masked_positions_of_a_prompt(name, holes):
    task = tasks.ALL_TASKS[name]
    prompts, _ = task.make_instances(20, 1)
    assert experiments.answer_length(prompts, task) == holes


def test_adaptive_rows_sweep_their_knob():
    rows = experiments.rule_rows([2, 3], 9)
    adaptive = [(label, setting, steps, cfg) for label, setting, _, steps, cfg in rows
                if label in ("entropy-bound", "threshold", "boe-adaptive")]
    assert len(adaptive) == 2 * len(experiments.ENTROPY_BOUNDS) + len(experiments.THRESHOLDS)
    for label, setting, steps, cfg in adaptive:
        knob, value = setting.split()
        assert steps == 9
        assert (cfg.entropy_bound if knob == "gamma" else cfg.confidence_threshold) == float(value)


def test_sudoku_checker_rejects_a_latin_square_that_breaks_a_box():
    square = tasks.SQUARES[~tasks.sudoku_valid(tasks.SQUARES)][:1]  # [1, 16] rows and columns fine, a box not
    empty = torch.full_like(square, tasks.SUDOKU_MASK)
    assert not tasks.SUDOKU.check(empty, square)[0]
    assert tasks.LATIN.check(empty, square)[0]


def test_countdown_evaluates_left_to_right():
    # tokens are value - 1: 5 - 2 + 1 is (5 - 2) + 1 = 4, not 5 - (2 + 1) = 2; 5 - 2 - 1 is 2, not 4
    assert tasks.countdown_value(4, tasks.CD_MINUS, 1, tasks.CD_PLUS, 0) == 4
    assert tasks.countdown_value(4, tasks.CD_MINUS, 1, tasks.CD_MINUS, 0) == 2
    prompt = torch.tensor([[4, 1, 0, tasks.CD_EQUALS, tasks.CD_TARGET0 + 4] + [tasks.CD_MASK] * 5])
    answer = prompt.clone()
    answer[0, 5:] = torch.tensor([4, tasks.CD_MINUS, 1, tasks.CD_PLUS, 0])
    assert tasks.countdown_check(prompt, answer)[0]


def test_countdown_uses_each_number_once_with_repeats():
    # numbers 2 2 5, target 8: 5 + 5 - 2 reaches it, but uses 5 twice and 2 once
    prompt = torch.tensor([[1, 1, 4, tasks.CD_EQUALS, tasks.CD_TARGET0 + 8] + [tasks.CD_MASK] * 5])
    answer = prompt.clone()
    answer[0, 5:] = torch.tensor([4, tasks.CD_PLUS, 4, tasks.CD_MINUS, 1])
    assert not tasks.countdown_check(prompt, answer)[0]


def test_the_held_out_split_is_the_one_the_shipped_weights_were_trained_without():
    # The shipped weights load whatever the split, so a changed split would quietly put evaluation grids or
    # prompts into the training of the models the tables measure: pin fingerprints of the splits they had.
    assert tasks.HELD_OUT.tolist()[:6] == [33, 56, 86, 174, 189, 187] and sum(tasks.HELD_OUT.tolist()) == 10198
    assert len(tasks.CD_HELD_OUT_KEYS) == 116 and len(tasks.CD_TUNING_KEYS) == 58


def test_pick_study_counts_a_wrong_pick_only_at_a_completable_state(monkeypatch, capsys):
    prompt, _ = boe.make_instances(1, seed=1)
    blocked = int((prompt[0, : boe.N_CELLS] == boe.BLOCKED).nonzero()[0])  # a cell that can never be marked
    alive = prompt.clone()  # nothing revealed: completable
    dead = prompt.clone()
    dead[0, boe.PROMPT_LEN + blocked] = boe.MARKED  # already impossible
    tokens = torch.cat([alive, dead])  # [2, L]
    masked = tokens == boe.MASK
    logits = torch.zeros(2, boe.SEQ_LEN, boe.MASK + 1)
    logits[:, :, boe.MARKED] = 5.0  # every position's argmax: '*'
    pick = boe.PROMPT_LEN + blocked  # row 0 marks the blocked cell: a wrong pick; row 1 picks the same, dead anyway
    scores = torch.zeros(2, boe.SEQ_LEN)
    scores[0, pick] = math.inf
    scores[1, boe.PROMPT_LEN + (blocked + 1) % boe.N_CELLS] = math.inf
    monkeypatch.setattr(boe, "boe_step", lambda *a, **k: (logits, scores, None, None))
    monkeypatch.setattr(tasks, "ALL_TASKS", {"marks": tasks.MARKS})
    monkeypatch.setattr(experiments, "suite_model", lambda task, seed: None)

    def fake_generate(model, prompts, steps, order, *args, **kwargs):
        if order == "boe-adaptive":
            boe.boe_step(tokens, masked)
    monkeypatch.setattr(boe, "generate", fake_generate)
    experiments.pick_study(1)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("marks") and "boe-adaptive" in l)
    picks, wrong = line.split()[2:4]
    assert (picks, wrong) == ("1", "1.000"), line


def float64_marks_model():
    model = experiments.suite_model(tasks.MARKS, 0).double()
    return model.requires_grad_(False)


def test_waiting_share_is_what_one_forward_after_revealing_the_near_certain_tokens_removes():
    # Oracle: per row in float64, the entropy bound's set taken by hand (ascending entropy, all but the
    # largest summing to at most gamma), its most uncertain token left masked, the rest revealed at the argmax.
    model = float64_marks_model()
    prompts, _ = boe.make_instances(12, seed=5)
    near, others, exact, _ = experiments.waiting_shares(model, prompts, bound=0.1)

    def masked_entropies(tokens):
        logits = model(tokens[None])[0]  # [L, V]
        logits[:, model.mask_id] = -math.inf
        return torch.special.entr(logits.softmax(-1)).sum(-1)  # [L]

    for row, prompt in enumerate(prompts):
        masked = prompt == model.mask_id  # [L]
        own = masked_entropies(prompt)  # [L]
        ascending = sorted(torch.nonzero(masked).flatten().tolist(), key=lambda i: own[i].item())
        admitted = max(n for n in range(1, len(ascending) + 1) if sum(own[i] for i in ascending[:n - 1]) <= 0.1)
        expected_near = torch.zeros_like(masked)
        expected_near[ascending[:admitted - 1]] = True
        assert torch.equal(near[row], expected_near)
        assert torch.equal(others[row], masked & ~expected_near)
        revealed = torch.where(expected_near, model(prompt[None])[0].argmax(-1), prompt)  # [L]
        before, after = own[others[row]].sum(), masked_entropies(revealed)[others[row]].sum()
        assert exact[row].item() == pytest.approx(((before - after) / before).item(), abs=1e-5)


def test_waiting_prediction_is_the_directional_derivative_of_the_uncertain_entropy():
    # The first-order share: d/de of the uncertain tokens' entropy along the near-certain tokens' reveal
    # directions (central finite differences in float64), over their entropy.
    model = float64_marks_model()
    prompts, _ = boe.make_instances(6, seed=6)
    near, others, exact, predicted = experiments.waiting_shares(model, prompts, bound=0.1)
    assert near.any(1).all()
    table = model.token_embedding.weight  # [V, D]
    argmax = model(prompts).argmax(-1)  # [n, L]
    direction = (table[argmax] - table[model.mask_id]) * near[..., None]  # [n, L, D]

    def uncertain_entropy(embeds):
        logits = model.forward_embeds(embeds)  # [n, L, V]
        logits[..., model.mask_id] = -math.inf
        return (torch.special.entr(logits.softmax(-1)).sum(-1) * others).sum(1)  # [n]

    embeds, step = model.embed(prompts), 1e-5  # [n, L, D]
    slope = (uncertain_entropy(embeds + step * direction) - uncertain_entropy(embeds - step * direction)) / (2 * step)
    torch.testing.assert_close(predicted, -slope / uncertain_entropy(embeds), rtol=1e-4, atol=1e-6)


def test_looking_first_never_looks_at_a_zero_bound_and_is_then_boe(monkeypatch):
    # With gamma = 0 nothing is near-certain, so no step could be filled without an uncertain token.
    monkeypatch.setattr(boe, "ATTENTION_BACKEND", "torch")  # the rule, not the kernel (test_kernel.py), is tested
    model = experiments.suite_model(tasks.MARKS, 0)
    prompts, _ = boe.make_instances(40, seed=7)
    cfg = boe.SamplerConfig(entropy_bound=0.0)
    tokens, record, counts = experiments.decode_looking_first(model, prompts, 3, cfg)
    want, want_record = boe.generate(model, prompts, 3, "boe", cfg)
    assert not counts["looks"].any() and counts["backwards"].any()
    assert torch.equal(tokens, want) and torch.equal(counts["backwards"], want_record["backwards"])
    assert torch.equal(record["forwards"], want_record["forwards"])


def test_looking_first_charges_each_look_and_decodes_as_confidence_where_it_never_picks(monkeypatch):
    # On the Sudoku model that learned the rules most looks wait: those decodings are confidence's.
    monkeypatch.setattr(boe, "ATTENTION_BACKEND", "torch")
    task = tasks.SUDOKU
    model = experiments.suite_model(task, 3)
    prompts, _ = task.make_instances(60, seed=1)
    tokens, record, counts = experiments.decode_looking_first(model, prompts, 3, boe.SamplerConfig())
    steps_run = record["reveal_step"].amax(1) + 1  # [n]
    assert torch.equal(record["forwards"], steps_run + counts["looks"])
    never_picked = counts["backwards"] == 0  # [n]
    assert counts["waits"][never_picked].any() and never_picked.any() and not never_picked.all()
    confidence, _ = boe.generate(model, prompts, 3, "confidence")
    assert torch.equal(tokens[never_picked], confidence[never_picked])


def test_looking_first_on_the_built_in_task_looks_waits_never_and_decodes_as_boe(monkeypatch):
    # Revealing the blocked cells' marks settles nothing of which open cell to name: every look finds the
    # bound still stuck, so BoE picks as it would have, and only the looks' forwards are added.
    monkeypatch.setattr(boe, "ATTENTION_BACKEND", "torch")
    model = experiments.suite_model(tasks.MARKS, 0)
    prompts, _ = boe.make_instances(60, seed=1)
    tokens, record, counts = experiments.decode_looking_first(model, prompts, 3, boe.SamplerConfig())
    want, want_record = boe.generate(model, prompts, 3, "boe")
    assert counts["looks"].any() and not counts["waits"].any()
    assert torch.equal(tokens, want) and torch.equal(counts["backwards"], want_record["backwards"])
    assert torch.equal(record["forwards"], want_record["forwards"] + counts["looks"])


def test_looking_first_looks_only_where_near_certain_tokens_alone_fill_the_budget(monkeypatch):
    # Rows with 9 masked positions and a budget of 3. Near-certain tokens (entropy 0; the bound admits them and
    # one uncertain token) number 3 in row 0, enough to fill the step without a guess: it looks, and pays a
    # forward. Row 1 has 2, so the step must reveal an uncertain token whatever a look shows; in row 2 every
    # position is near-certain, so BoE has nothing to pick. Neither looks.
    monkeypatch.setattr(boe, "ATTENTION_BACKEND", "torch")
    model = experiments.suite_model(tasks.MARKS, 0)
    prompts, _ = boe.make_instances(3, seed=0)
    masked = prompts == boe.MASK  # [3, L], 9 a row
    probs = torch.nn.functional.one_hot(prompts, boe.MASK + 1).float()  # [3, L, V] given tokens: certain
    probs[masked] = torch.tensor([1 / 3] * 3 + [0.0] * (boe.MASK - 2))  # uncertain: log 3 nats
    for row, near_certain in enumerate((3, 2, 9)):
        positions = masked[row].nonzero().flatten()[:near_certain]
        probs[row, positions] = torch.nn.functional.one_hot(torch.tensor(boe.UNMARKED), boe.MASK + 1).float()
    counts = {name: torch.zeros(3, dtype=torch.long) for name in ("backwards", "looks", "waits")}
    forwards = torch.zeros(3, dtype=torch.long)
    step = boe.Step(model, prompts, masked, probs, torch.tensor([3, 3, 3]), 1.0, boe.SamplerConfig(),
                    [torch.Generator().manual_seed(b) for b in range(3)], forwards)
    experiments.look_first(model, boe.SamplerConfig(), counts)(step)
    assert counts["looks"].tolist() == [1, 0, 0] and forwards.tolist() == [1, 0, 0]


def test_pick_successors_commit_boes_pick_and_the_bounds_own_token_at_stuck_states(monkeypatch):
    # At each state the bound is stuck (it admits one token); one successor reveals what boe_step picks there,
    # the other the least uncertain masked position, as the entropy bound's step would; each at its argmax.
    monkeypatch.setattr(boe, "ATTENTION_BACKEND", "torch")
    task = tasks.COUNTDOWN
    model = experiments.suite_model(task, 0)
    prompts, _ = task.make_instances(40, seed=1)
    cfg = boe.SamplerConfig(lam=0.0)  # no penalty: a step's pick does not depend on its progress, which a state hides
    states, after_pick, after_bound = experiments.pick_successors(model, prompts, 5, cfg)
    masked = states == model.mask_id  # [N, L]
    assert len(states) > 10
    assert ((after_pick != states).sum(1) == 1).all() and ((after_bound != states).sum(1) == 1).all()
    logits, probs = boe.predict(model, states)  # [N, L, V]
    own = boe.entropy(probs)  # [N, L]
    assert (boe.entropy_bound_count(own, masked, cfg.entropy_bound) == 1).all()
    argmax = logits.argmax(-1)  # [N, L]
    least = own.masked_fill(~masked, math.inf).argmin(1)  # [N]
    want = states.clone()
    want[torch.arange(len(states)), least] = argmax[torch.arange(len(states)), least]
    assert torch.equal(after_bound, want)
    one = torch.ones(len(states), dtype=torch.long)  # [N] the schedule's floor at every state
    _, scores, _, _ = boe.boe_step(states, masked, one, model.token_embedding.weight, model.forward_embeds,
                                   model.mask_id, cfg, adaptive=True)
    picked = scores == math.inf  # [N, L]
    assert (picked.sum(1) == 1).all()
    assert torch.equal(after_pick, torch.where(picked, argmax, states))
    assert (after_pick != after_bound).any()


def test_reveal_drops_are_the_probes_entropy_with_the_candidate_masked_minus_revealed():
    # The fidelity study's "target": candidate i moves from E[MASK] to its reveal, every other position keeping
    # its embedding in the context, here one where candidates sit at other embeddings (as at the surrogate).
    torch.manual_seed(0)
    model = boe.MaskedDiffusionTransformer(boe.ModelConfig(n_layer=2, n_head=2, d_model=32)).double().eval()
    prompts, _ = boe.make_instances(3, seed=2)
    context = model.embed(prompts).detach() + 0.3 * torch.randn(*prompts.shape, 32, dtype=torch.float64)  # [B, L, D]
    reveal_embeds = torch.randn(context.shape, dtype=torch.float64)  # [B, L, D]
    positions = torch.tensor([[9, 12, 17], [10, 11, 12], [17, 16, 15]])  # [B, K]
    valid = torch.tensor([[True, True, False], [True, False, True], [True, True, True]])  # [B, K]
    probes = prompts == boe.MASK  # [B, L]
    drops = experiments.reveal_drops(model, context, reveal_embeds, positions, valid, probes)  # [B, K]

    def probe_entropy(embeds):  # [L, D] -> the probes' summed entropy, [MASK] never predicted
        logits = model.forward_embeds(embeds[None])[0, :, : boe.MASK]  # [L, V - 1], [MASK] is the last id
        return torch.special.entr(logits.softmax(-1)).sum(-1)[probes[b]].sum()

    with torch.no_grad():
        for b in range(3):
            for k in range(3):
                before, after = context[b].clone(), context[b].clone()  # [L, D]
                before[positions[b, k]] = model.token_embedding.weight[boe.MASK]
                after[positions[b, k]] = reveal_embeds[b, positions[b, k]]
                want = probe_entropy(before) - probe_entropy(after) if valid[b, k] else 0.0
                assert math.isclose(drops[b, k].item(), float(want), abs_tol=1e-5)  # drops: float32 entropies


def test_spearman_is_one_minus_six_sum_of_squared_rank_differences_over_k_k2_minus_1():
    # Without ties, Spearman's rho = 1 - 6 sum d_i^2 / (k (k^2 - 1)), d_i the difference of i's two ranks.
    gen = torch.Generator().manual_seed(0)
    for k in (3, 5, 17):
        for _ in range(20):
            a, b = torch.randn(k, generator=gen), torch.randn(k, generator=gen)  # [k], [k] no ties
            d = a.argsort().argsort() - b.argsort().argsort()  # [k]
            want = 1 - 6 * (d.double() ** 2).sum().item() / (k * (k * k - 1))
            assert math.isclose(experiments.spearman(a, b), want, abs_tol=1e-12)
    assert experiments.spearman(torch.arange(4.0), -torch.arange(4.0)) == pytest.approx(-1)
