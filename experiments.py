"""The measurements behind the README, on the task suite of tasks.py. boe.py is the method; this is how it
was measured. `python boe.py` prints its table with builtin_table below; each subcommand prints another:

    python experiments.py suite [--quick] [--plot DIR]   every rule on every task, 3 trained models a task
                              [--temperature T]          (with every commit sampled at T)
                              [--train-seeds S ...]      (or the models of other training seeds)
    python experiments.py tune                           BoE's grid search, on the tuning instances (seed 0)
    python experiments.py picks                          where BoE helps: how often a pick is wrong, what it buys
    python experiments.py fidelity                       how well TIS ranks candidates against exact drops
    python experiments.py ablations                      BoE and the lookahead taken apart
    python experiments.py show INSTANCE                  one decoding by every rule, step by step
    python experiments.py time-backward                  the cost of BoE's backward, timed here, in forwards
    python experiments.py noise                          how many decodings tiny changes to the weights change
    python experiments.py loss                           each model's training loss: where training stopped
    python experiments.py precision                      the built-in task's model in float32, bfloat16, float16
    python experiments.py train [--train-seeds S ...]    train (or load) every model of the suite

The models are the shipped weights in weights/ (TASK-seedS.pt); a missing or stale file is retrained with
boe.py's training code. --plot needs matplotlib (pip install matplotlib), which nothing else here uses.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch

import boe
import tasks

SEEDS = (0, 1, 2)            # training seeds: every suite number is over these three models of a task
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # the shipped models, wherever run from
INSTANCES = 1000             # evaluation instances per task (seed 1)
TUNING = 300                 # tuning instances per task (seed 0)


# -----------------------------------------------------------------------------
# Trained models: the shipped weights, or boe.py's training where they are missing or stale


def load_or_train(model_cfg, train_cfg, make_batch=boe.make_instances, task="marks", retrain=False):
    """Load the cached weights if they were made with these settings; otherwise train and cache."""
    settings = {"task": task, "model": asdict(model_cfg),
                "train": {k: v for k, v in asdict(train_cfg).items() if k != "cache"}}
    if not retrain and os.path.exists(train_cfg.cache):
        try:
            saved = torch.load(train_cfg.cache, weights_only=True)
            if saved["configs"] == settings:
                model = boe.MaskedDiffusionTransformer(model_cfg)
                model.load_state_dict(saved["state_dict"])
                return model.eval()
            print(f"{train_cfg.cache} was trained with other settings; retraining")
        except Exception as err:  # any unreadable or foreign file: say so and retrain
            print(f"{train_cfg.cache} could not be loaded ({type(err).__name__}: {err}); retraining")
    check_writable(train_cfg.cache)  # before training, not after it
    model = boe.train(model_cfg, train_cfg, make_batch)
    torch.save({"configs": settings, "state_dict": model.state_dict()}, train_cfg.cache)
    return model


def check_writable(path):
    """Make the folder of `path` and check that `path` itself can be written (through a link, where it is
    one), leaving an existing file as it is: an OSError that names the path, before a long run rather than
    after it."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(21, "it is a folder")
        existed = os.path.lexists(path)
        open(path, "ab").close()
        if not existed:
            os.remove(path)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err


def suite_model(task, seed, retrain=False):
    cache = os.path.join(WEIGHTS, f"{task.name}-seed{seed}.pt")
    cfg = boe.TrainConfig(steps=task.train_steps, seed=seed, cache=cache)
    return load_or_train(task.model_cfg, cfg, task.training_batch, task=task.name, retrain=retrain)


def answer_length(prompts, task):
    return int((prompts == task.model_cfg.mask_id).sum(1).max())


# -----------------------------------------------------------------------------
# The exact one-step lookahead: what BoE's estimate approximates, measured (boe.py section 4)
#
# Not a sampler to run (one forward per candidate a step), but the yardstick the tables and the fidelity
# study hold BoE against. It is an order rule like boe.py's, passed to boe.generate as a function.


def lookahead_costs(s, positions, valid, counted=None, own_entropy=True):
    """Exact one-step lookahead at a boe.Step for each candidate (positions, valid [B, K]): commit it
    (argmax), run a forward, and measure the total entropy left on the other masked positions (or on the
    `counted` ones, bool [B, L]). One forward per candidate, charged to s.forwards: the O(K) search.

    cost_i = H_i + sum_{j masked, j != i} H(p_j | x_t with i revealed)   (information-gain form)
    own_entropy=False drops the H_i term (the pure-future ablation). Without it a wrong but confident
    commit looks good: it makes the rest of the sequence consistent with itself."""
    B, K = positions.shape
    rows = torch.arange(B, device=positions.device)  # [B]
    own = boe.entropy(s.probs)  # [B, L]
    committed = s.probs.argmax(-1)  # [B, L]
    costs = torch.full((B, K), math.inf, device=positions.device)  # [B, K]
    for k in range(K):
        live = valid[:, k]  # [B]
        if not live.any():
            continue
        pos = positions[live, k]  # [b]
        trial = s.tokens[live].clone()  # [b, L]
        trial[rows[: len(pos)], pos] = committed[live, pos]
        with torch.no_grad():
            _, probs = boe.predict(s.model, trial)  # [b, L, V]
        still_counted = (s.masked if counted is None else counted)[live].clone()  # [b, L]
        still_counted[rows[: len(pos)], pos] = False
        future = (boe.entropy(probs) * still_counted).sum(1)  # [b]
        costs[live, k] = future + (own[live, pos] if own_entropy else 0)
        s.forwards[live] += 1
    return costs  # [B, K]


def lookahead(k=0, own_entropy=True):
    """The exact lookahead as an order rule: the k most confident masked positions (0 = all, at least
    the budget) ranked by lookahead_costs, above every other position (those by confidence). A row that
    reveals all it has left has nothing to search."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"lookahead k must be an int >= 0 (0 = every masked position); got {k!r}")

    def score_lookahead(s):
        confidence = s.probs.max(-1).values  # [B, L]
        count = s.masked.sum(1) if k == 0 else torch.full_like(s.budget, k)  # [B]
        positions, valid = boe.top_masked(confidence, s.masked, torch.maximum(count, s.budget))  # [B, K]
        valid &= (s.budget < s.masked.sum(1))[:, None]  # [B, K]
        costs = lookahead_costs(s, positions, valid, own_entropy=own_entropy)  # [B, K]
        searched = torch.zeros_like(s.masked).scatter(1, positions, valid)  # [B, L]
        neg_cost = torch.zeros_like(confidence).scatter(1, positions, -costs)  # [B, L]
        # Every other position below the row's lowest searched score, in confidence order (in [0, 1]).
        lowest = neg_cost.masked_fill(~searched, math.inf).amin(1, keepdim=True)  # [B, 1]
        lowest = lowest.masked_fill(~searched.any(1, keepdim=True), 0.0)  # [B, 1] rows with nothing searched
        return torch.where(searched, neg_cost, lowest - 2 + confidence)  # [B, L]

    return score_lookahead


# -----------------------------------------------------------------------------
# The built-in task's table (python boe.py), and how every table counts compute
#
# Compute is counted per instance in forward-equivalents: forwards + BACKWARD_COST x backwards. A BoE
# step at the state runs its forward with gradient tracking and one backward to the input embeddings;
# we count that as 2 forwards beyond a plain one, about what it costs on a CPU with these models (timed
# by `python experiments.py time-backward`; it moves from run to run) and more than its arithmetic (the
# backward to the inputs repeats the forward's matmuls once). A fixed price keeps every table the same
# on every machine; the forwards and backwards are printed, for any other price. boe-adaptive prices its
# backward the same (SamplerConfig.backward_cost) when it decides whether a pick can pay.
BACKWARD_COST = boe.SamplerConfig.backward_cost

FIXED_RULES = {name: name for name in ("random", "left-to-right", "confidence", "margin", "entropy")} | {
    "lookahead": lookahead(), "boe": "boe"}  # label -> order for boe.generate
ENTROPY_BOUNDS = (0.01, 0.1, 0.3, 1.0)  # gamma, nats: the EB-sampler's usual range and above
THRESHOLDS = (0.99, 0.9, 0.7)            # tau: around Fast-dLLM's 0.9


def wilson_interval(successes, n, z=1.96):
    """95 % Wilson score interval for a binomial proportion."""
    if n < 1:
        raise ValueError(f"a proportion needs n >= 1 trials; got n = {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval holds p; at p = 0 or 1 rounding can leave an end a hair on the wrong side of it.
    return min(max(centre - half, 0.0), p), max(min(centre + half, 1.0), p)


def evaluate(model, prompts, label, setting, order, steps, cfg, solved_fn=boe.check, backward_cost=BACKWARD_COST):
    """One row of a table: decode `prompts`, check them, count the compute per instance."""
    tokens, record = boe.generate(model, prompts, steps, order, cfg)
    solved = int(solved_fn(tokens).sum())
    forwards, backwards = record["forwards"].float().mean().item(), record["backwards"].float().mean().item()
    return dict(rule=label, setting=setting, steps=steps, accuracy=solved / len(prompts),
                ci95=wilson_interval(solved, len(prompts)), forwards=forwards, backwards=backwards,
                fwd_equiv=forwards + backward_cost * backwards, wall_s=record["wall_s"])


def rule_rows(steps_list, max_steps, paper=False, temperature=0.0):
    """(label, setting, order, steps, cfg) for every rule: the fixed-schedule rules at each budget, and
    the adaptive ones swept over their knob with `max_steps` as a cap that never binds; every rule
    commits at `temperature`."""
    default = replace(boe.PAPER_BOE if paper else boe.SamplerConfig(), temperature=temperature)
    paper_boe = replace(boe.PAPER_BOE, temperature=temperature)
    rows = [(label, f"{steps} steps", order, steps, default) for steps in steps_list
            for label, order in FIXED_RULES.items()]
    rows += [] if paper else [("boe (paper)", f"{steps} steps", "boe", steps, paper_boe) for steps in steps_list]
    for order, knob, values in (("entropy-bound", "entropy_bound", ENTROPY_BOUNDS),
                                ("threshold", "confidence_threshold", THRESHOLDS),
                                ("boe-adaptive", "entropy_bound", ENTROPY_BOUNDS)):
        name = "gamma" if knob == "entropy_bound" else "tau"
        rows += [(order, f"{name} {value}", order, max_steps, replace(default, **{knob: value}))
                 for value in values]
    return rows


def frontier(rows):
    """The rows no cheaper (or equally cheap) row matches in accuracy, by cost: a set of (rule, setting)."""
    best, on = -1.0, set()
    for row in sorted(rows, key=lambda r: (r["fwd_equiv"], -r["accuracy"])):
        if row["accuracy"] > best:
            on.add((row["rule"], row["setting"]))
        best = max(best, row["accuracy"])
    return on


def print_table(rows):
    on = frontier(rows)
    print(f"{'rule':<16}{'setting':<12}{'accuracy':>9}{'95% interval':>17}{'forwards':>10}{'backwards':>10}"
          f"{'fwd-equiv':>10}   (* = on the compute frontier)")
    for row in sorted(rows, key=lambda r: r["fwd_equiv"]):
        low, high = row["ci95"]
        print(f"{row['rule']:<16}{row['setting']:<12}{row['accuracy']:>9.3f}   [{low:.3f}, {high:.3f}]"
              f"{row['forwards']:>10.2f}{row['backwards']:>10.2f}{row['fwd_equiv']:>10.2f}"
              f"{'   *' if (row['rule'], row['setting']) in on else ''}")


def builtin_table(model, prompts, steps_list, paper=False, json_path=None, temperature=0.0):
    """boe.py's main job: every rule on the built-in task, printed against compute."""
    cap = boe.SEQ_LEN - boe.PROMPT_LEN
    rows = [evaluate(model, prompts, label, setting, order, steps, cfg)
            for label, setting, order, steps, cfg in rule_rows(steps_list, cap, paper, temperature)]
    commits = f"a sample at temperature {temperature:g}" if temperature else "the argmax"
    print(f"\n{len(prompts)} instances, sorted by compute; every rule commits {commits}. Per instance: forwards, "
          f"backwards, and fwd-equiv = forwards + {BACKWARD_COST:g} x backwards. The adaptive rules (entropy-bound, "
          f"threshold, boe-adaptive) decide each step's size, capped at {cap} steps.")
    print_table(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


# -----------------------------------------------------------------------------
# The suite: every rule on every task, over several trained models


def run_suite(task_names, seeds, instances, steps_override=None, temperature=0.0):
    """{task: {(rule, setting): [row per model]}}, rows as evaluate makes them, plus "solved" ("1" where
    instance i is solved, "0" where not); every rule commits at `temperature` (0: the argmax)."""
    results = {}
    for name in task_names:
        task = tasks.ALL_TASKS[name]
        prompts, _ = task.make_instances(instances, seed=1)
        checked = {}

        def solved(tokens):  # kept per instance, for the interval over models (pooled)
            checked["solved"] = task.check(prompts, tokens)  # [n] bool
            return checked["solved"]

        rows = rule_rows(steps_override or task.steps, answer_length(prompts, task), temperature=temperature)
        results[name] = {}
        for seed in seeds:
            model = suite_model(task, seed)
            start = time.time()
            for label, setting, order, steps, cfg in rows:
                row = evaluate(model, prompts, label, setting, order, steps, cfg, solved)
                row.update(solved="".join("01"[ok] for ok in checked["solved"].tolist()))  # instance i solved
                results[name].setdefault((label, setting), []).append(row)
            print(f"{name}, model seed {seed}: {len(rows)} rules in {time.time() - start:.0f} s", flush=True)
    return results


def pooled(rows):
    """The rows of one rule over the models: mean accuracy, its range, the 95 % interval of the mean model
    (pooled_interval), and the mean compute."""
    solved = torch.tensor([[mark == "1" for mark in row["solved"]] for row in rows])  # [M, N]
    accuracies = [row["accuracy"] for row in rows]
    return dict(rule=rows[0]["rule"], setting=rows[0]["setting"], accuracy=sum(accuracies) / len(rows),
                low=min(accuracies), high=max(accuracies), ci95=pooled_interval(solved),
                forwards=sum(row["forwards"] for row in rows) / len(rows),
                backwards=sum(row["backwards"] for row in rows) / len(rows),
                fwd_equiv=sum(row["fwd_equiv"] for row in rows) / len(rows))


def pooled_interval(solved):
    """95 % interval of the mean accuracy of M models that decoded the same N instances, from solved [M, N]
    (bool). The M N decodings are not independent trials: an instance one model fails, the others often fail
    too. So Wilson's interval is taken at Kish's effective sample size n_eff = M N / deff, with the design
    effect deff = M var(m) / (p (1 - p)) over the instances' means m across models: n_eff = N where the
    models agree on every instance, M N where they fail independently (more is not counted)."""
    models, n = solved.shape
    per_instance = solved.double().mean(0)  # [N] m_i, the share of models that solve instance i
    p, variance = per_instance.mean().item(), per_instance.var(unbiased=False).item()
    if p * (1 - p) == 0:  # every decoding solved, or none: the models agree everywhere
        n_eff = n
    else:
        n_eff = min(max(n * p * (1 - p) / variance if variance > 0 else math.inf, n), models * n)
    return wilson_interval(p * n_eff, n_eff)


def print_suite(results):
    for name, by_rule in results.items():
        task = tasks.ALL_TASKS[name]
        models = len(next(iter(by_rule.values())))
        per_model_frontier = [frontier([rows[m] for rows in by_rule.values()]) for m in range(models)]
        print(f"\n{name} ({task.kind}): {models} models, mean over them; range = lowest and highest model; "
              f"interval = 95 % of the mean model (pooled_interval); frontier = on how many models' compute frontier")
        print(f"{'rule':<16}{'setting':<12}{'accuracy':>9}{'range':>16}{'95% interval':>17}{'forwards':>10}"
              f"{'backwards':>10}{'fwd-equiv':>10}{'frontier':>10}")
        for rows in sorted(by_rule.values(), key=lambda rows: pooled(rows)["fwd_equiv"]):
            row = pooled(rows)
            on = sum((row["rule"], row["setting"]) in front for front in per_model_frontier)
            print(f"{row['rule']:<16}{row['setting']:<12}{row['accuracy']:>9.3f}   [{row['low']:.3f}, {row['high']:.3f}]"
                  f"   [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]{row['forwards']:>10.2f}{row['backwards']:>10.2f}"
                  f"{row['fwd_equiv']:>10.2f}{f'{on}/{models}' if on else '':>10}")
        print_comparisons(by_rule)


def apart(mine, theirs):
    """'+' where interval `mine` lies above `theirs`, '-' where below, '=' where they overlap."""
    return "+" if mine[0] > theirs[1] else "-" if mine[1] < theirs[0] else "="


def print_comparisons(by_rule):
    """BoE against the rule it replaces, at each budget (fixed schedule, against confidence) and each gamma
    (adaptive, against the entropy bound): for the mean model (pooled_interval) and for each model (its own
    interval over the instances), '+' better with the 95 % intervals apart, '-' worse, '=' neither."""
    print("BoE against confidence (fixed schedule) and against the entropy bound (adaptive): + better, - worse "
          "(95 % intervals apart), = neither; the mean model, then each model")
    for (rule, setting), rows in by_rule.items():
        other = by_rule.get(({"boe": "confidence", "boe-adaptive": "entropy-bound"}.get(rule), setting))
        if other:
            each = " ".join(apart(mine["ci95"], theirs["ci95"]) for mine, theirs in zip(rows, other))
            print(f"  {rule:<14}{setting:<12}{apart(pooled(rows)['ci95'], pooled(other)['ci95']):>3}    {each}")


FAMILIES = {  # how the plot draws each rule: one line through its settings
    "random": ("tab:gray", "o"), "confidence": ("tab:blue", "o"), "left-to-right": ("tab:olive", "o"),
    "margin": ("tab:cyan", "o"), "entropy": ("tab:purple", "o"), "lookahead": ("tab:brown", "s"),
    "boe": ("tab:red", "D"), "boe (paper)": ("salmon", "D"), "entropy-bound": ("tab:green", "^"),
    "threshold": ("tab:orange", "v"), "boe-adaptive": ("darkred", "*"),
}


def plot_suite(results, folder):
    """One PNG per task: accuracy against fwd-equiv, one line per rule through its settings (the budgets
    of a fixed-schedule rule, the sweep of an adaptive one), the mean model's 95 % interval (pooled_interval)
    as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(folder, exist_ok=True)
    for name, by_rule in results.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for family, (colour, marker) in FAMILIES.items():
            rows = [pooled(r) for r in by_rule.values() if r[0]["rule"] == family]  # in the order of the sweep
            if not rows:
                continue
            x, y = [r["fwd_equiv"] for r in rows], [r["accuracy"] for r in rows]
            errors = [[max(r["accuracy"] - r["ci95"][0], 0) for r in rows],
                      [max(r["ci95"][1] - r["accuracy"], 0) for r in rows]]
            ax.errorbar(x, y, yerr=errors, color=colour, marker=marker, markersize=7 if marker == "*" else 5,
                        capsize=2, linewidth=1, label=family)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(f"forward-equivalents per instance (a backward = {BACKWARD_COST:g} forwards)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}, mean of {len(next(iter(by_rule.values())))} models\n{tasks.ALL_TASKS[name].kind}",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(folder, f"frontier-{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")


# -----------------------------------------------------------------------------
# BoE's grid search, on the tuning instances of every task


ESTIMATORS = (("tangent", "onehot"), ("tangent", "soft"), ("norm", "onehot"), ("norm-entropy", "onehot"),
              ("norm-surprisal", "onehot"))


def tune(instances):
    """Every combination of BoE's main knobs, fixed schedule and adaptive, on `instances` tuning instances
    (seed 0) of every task, with every trained model of the task, ranked by accuracy averaged over tasks
    (each task's budgets and models averaged first, so that every task counts the same; on a tie, the
    cheaper first). The defaults follow the README's rule: one changes only where another configuration
    beats it by more than 0.01, about one standard error of these means."""
    grid = [replace(boe.SamplerConfig(), estimator=estimator, reveal=reveal, influential=influential, lam=lam,
                    h_max=h_max, sparse_backward=sparse)
            for estimator, reveal in ESTIMATORS for influential in (0, 1)
            for lam, h_max in ((0.0, 0.0), (1.0, 0.5)) for sparse in (True, False)]
    adaptive_grid = [replace(boe.SamplerConfig(), estimator=estimator, reveal=reveal, adaptive_pick=pick)
                     for estimator, reveal in ESTIMATORS for pick in ("stuck", "always")]
    scores = {("boe", i): [] for i in range(len(grid))} | {("boe-adaptive", i): [] for i in range(len(adaptive_grid))}
    default = boe.SamplerConfig()
    scores["look-first"] = []  # not a configuration of the grid: a rule of its own (look_first), at the defaults
    for task in tasks.TASKS.values():
        prompts, _ = task.make_instances(instances, seed=0)
        solved = lambda tokens: task.check(prompts, tokens)  # noqa: E731
        budgets = task.steps[:-1]  # the last budget is one reveal a step, where BoE is confidence
        per_model = {key: [] for key in scores}
        for seed in SEEDS:
            model = suite_model(task, seed)
            for i, cfg in enumerate(grid):
                rows = [evaluate(model, prompts, "", "", "boe", steps, cfg, solved) for steps in budgets]
                per_model["boe", i].append([sum(r[k] for r in rows) / len(rows) for k in ("accuracy", "fwd_equiv")])
            looking = []  # [accuracy, fwd-equiv] per budget: the default BoE that looks before it picks
            for steps in budgets:
                tokens, record, _ = decode_looking_first(model, prompts, steps, default)
                looking.append([solved(tokens).float().mean().item(),
                                (record["forwards"] + default.backward_cost * record["backwards"]).float().mean().item()])
            per_model["look-first"].append([sum(r[k] for r in looking) / len(looking) for k in (0, 1)])
            for i, cfg in enumerate(adaptive_grid):
                row = evaluate(model, prompts, "", "", "boe-adaptive", answer_length(prompts, task), cfg, solved)
                per_model["boe-adaptive", i].append([row["accuracy"], row["fwd_equiv"]])
            print(f"tuned on {task.name}, model seed {seed}", flush=True)
        for key, results in per_model.items():  # the task's mean over its models
            scores[key].append([sum(r[k] for r in results) / len(results) for k in (0, 1)])
    for order, configs in (("boe", grid), ("boe-adaptive", adaptive_grid)):
        ranked = sorted(range(len(configs)), key=lambda i: (-sum(a for a, _ in scores[order, i]),
                                                            sum(c for _, c in scores[order, i])))
        print(f"\n{order}: mean accuracy over tasks ({', '.join(tasks.TASKS)}) on {instances} tuning instances "
              f"(seed 0), best first; per task: accuracy / fwd-equiv")
        for i in ranked[:8]:
            cfg, per_task = configs[i], scores[order, i]
            knobs = (f"estimator={cfg.estimator} reveal={cfg.reveal} " +
                     (f"influential={cfg.influential} lam={cfg.lam} h_max={cfg.h_max} sparse_backward="
                      f"{cfg.sparse_backward}" if order == "boe" else f"adaptive_pick={cfg.adaptive_pick}"))
            print(f"  {sum(a for a, _ in per_task) / len(per_task):.4f}  {knobs}   " +
                  "  ".join(f"{a:.3f}/{c:.1f}" for a, c in per_task))
    per_task = scores["look-first"]
    print(f"\nboe at the defaults, looking before each pick (look_first; one more forward a look):\n"
          f"  {sum(a for a, _ in per_task) / len(per_task):.4f}   " + "  ".join(f"{a:.3f}/{c:.1f}" for a, c in per_task))


# -----------------------------------------------------------------------------
# Where BoE helps: how often its pick is wrong, against confidence's reveal at the same step


@contextlib.contextmanager
def watching_boe_step(watch):
    """Within the block, boe.boe_step (which generate calls) also calls watch(tokens, masked, logits,
    scores) after each step, with what the step saw and returned."""
    real_boe_step = boe.boe_step

    def watched(tokens, masked, *args, **kwargs):
        logits, scores, budget, charged = real_boe_step(tokens, masked, *args, **kwargs)
        watch(tokens, masked, logits, scores)
        return logits, scores, budget, charged

    boe.boe_step = watched
    try:
        yield
    finally:
        boe.boe_step = real_boe_step


def pick_study(instances, train_seed=0):
    """Along BoE's own decodings (fixed schedule at the task's budgets with a choice, and adaptive), at every
    step where BoE picks a reveal by its score: is the row still completable (a valid answer agrees with every
    revealed token) after the pick, and would it be after confidence's reveal instead (the most confident
    position, at its argmax)? Counted only at states that are still completable. Also the entropy of the two
    reveals: the model's marginals are all a sampler sees of the two kinds of uncertainty."""
    print("How often a reveal makes the row impossible to complete, BoE's pick against confidence's choice at "
          f"the same step (seed-{train_seed} models, evaluation instances)")
    print(f"{'task':<11}{'sampler':<22}{'picks':>7}{'BoE wrong':>11}{'confidence wrong':>18}"
          f"{'H(BoE pick)':>13}{'H(confidence)':>15}")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        model = suite_model(task, train_seed)
        for label, order, steps_list in (("boe, fixed schedule", "boe", task.steps[:-1]),
                                         ("boe-adaptive", "boe-adaptive", [answer_length(prompts, task)])):
            seen = []

            def record(tokens, masked, logits, scores):
                picked = scores == math.inf  # [B, L]
                rows = picked.any(1)  # [B]
                if rows.any():
                    confidence = logits.softmax(-1).max(-1).values.masked_fill(~masked, -1)  # [B, L]
                    seen.append((tokens[rows], logits[rows], picked[rows], confidence[rows].argmax(1)))

            with watching_boe_step(record):
                for steps in steps_list:
                    boe.generate(model, prompts, steps, order)
            counts = dict(picks=0, boe=0, confidence=0, h_boe=0.0, h_confidence=0.0)
            for tokens, logits, picked, choice in seen:
                own = boe.entropy(logits.softmax(-1))  # [b, L]
                rows = torch.arange(len(tokens))
                alive = tasks.completable(task, tokens, tokens)  # [b]
                pick = picked.float().argmax(1)  # [b] the first pick (one a step by default)
                after_pick, after_choice = tokens.clone(), tokens.clone()
                after_pick[rows, pick] = logits[rows, pick].argmax(-1)
                after_choice[rows, choice] = logits[rows, choice].argmax(-1)
                counts["picks"] += int(alive.sum())
                counts["boe"] += int((alive & ~tasks.completable(task, tokens, after_pick)).sum())
                counts["confidence"] += int((alive & ~tasks.completable(task, tokens, after_choice)).sum())
                counts["h_boe"] += float(own[rows, pick][alive].sum())
                counts["h_confidence"] += float(own[rows, choice][alive].sum())
            n = max(counts["picks"], 1)
            print(f"{task.name:<11}{label:<22}{counts['picks']:>7}{counts['boe'] / n:>11.3f}"
                  f"{counts['confidence'] / n:>18.3f}{counts['h_boe'] / n:>13.2f}{counts['h_confidence'] / n:>15.2f}")


def first_picks(instances):
    """Adaptive BoE on the built-in task, per trained model: what its first pick is (the pivot, or an open
    cell's mark, committed '*' or '-'), and how many backwards an instance it then needs. A mark committed
    '-' rules out one cell and settles little, so another pick follows."""
    print(f"\nAdaptive BoE's first pick on marks, per model ({instances} evaluation instances): share of the "
          f"instances, and backwards an instance")
    print(f"{'model':<8}{'pivot':>8}{'mark *':>9}{'mark -':>9}{'no pick':>9}{'backwards':>11}")
    prompts, _ = boe.make_instances(instances, seed=1)
    for seed in SEEDS:
        model = suite_model(tasks.MARKS, seed)
        position = torch.full((instances,), -1)  # [n] each row's first pick, -1 = none yet
        value = torch.full((instances,), -1)  # [n] the token it committed

        def record_first(tokens, masked, logits, scores):
            first = (scores == math.inf).any(1) & (position < 0)  # [n] rows picking for the first time
            position[first] = (scores[first] == math.inf).float().argmax(1)
            value[first] = logits[first, position[first]].argmax(-1)

        with watching_boe_step(record_first):
            _, record = boe.generate(model, prompts, boe.SEQ_LEN - boe.PROMPT_LEN, "boe-adaptive")
        mark = (position >= 0) & (position < boe.SEQ_LEN - 1)  # [n]
        shares = [position == boe.SEQ_LEN - 1, mark & (value == boe.MARKED), mark & (value == boe.UNMARKED),
                  position < 0]
        print(f"seed {seed:<3}" + "".join(f"{share.float().mean().item():>{w}.3f}" for share, w in
                                          zip(shares, (8, 9, 9, 9))) + f"{record['backwards'].float().mean():>11.2f}")


def stuck_choices(instances, train_seed=0, bound=0.1):
    """At the steps where the entropy bound admits one token although several are masked (along its own
    decodings, seed-0 models unless told): how often a score's first choice is the exact one, the masked
    position whose reveal (argmax) lowers the other masked positions' entropy most (one forward per position)."""
    print(f"\nAt the steps where the entropy bound (gamma {bound}) is stuck: how often each score's first choice "
          f"is the exact one (the largest drop of the others' entropy), seed-{train_seed} models")
    print(f"{'task':<11}{'states':>8}{'|g|':>8}{'|g| (-log c)':>14}{'|g| H':>8}{'tangent':>9}{'most uncertain':>16}"
          f"{'least uncertain':>17}")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        model = suite_model(task, train_seed)
        found = []

        def entropy_bound_recording(s):
            own = boe.entropy(s.probs)  # [B, L]
            count = boe.entropy_bound_count(own, s.masked, bound)  # [B]
            found.append(s.tokens[(count <= 1) & (s.masked.sum(1) > 1)])
            return -own, count

        boe.generate(model, prompts, prompts.shape[1], entropy_bound_recording)
        states = torch.cat(found)  # [N, L]
        masked = states == model.mask_id  # [N, L]
        with torch.no_grad():
            logits, probs = boe.predict(model, states)  # [N, L, V]
        own = boe.entropy(probs)  # [N, L]
        exact = torch.full(states.shape, -math.inf)  # [N, L]
        for i in range(states.shape[1]):
            rows = masked[:, i]  # [N]
            if rows.any():
                revealed = states[rows].clone()  # [n, L]
                revealed[:, i] = logits[rows, i].argmax(-1)
                with torch.no_grad():
                    after = boe.entropy(boe.predict(model, revealed)[1])  # [n, L]
                others = masked[rows].clone()  # [n, L]
                others[:, i] = False
                exact[rows, i] = ((own[rows] - after) * others).sum(1)
        table = model.token_embedding.weight.detach()  # [V, D]
        _, grad = boe.entropy_gradient(model.forward_embeds, model.embed(states), masked, model.mask_id, masked)
        delta = table[logits.argmax(-1)] - table[model.mask_id]  # [N, L, D]
        estimates = [boe.influence_scores(grad, delta, probs, masked, boe.SamplerConfig(estimator=estimator))
                     for estimator in ("norm", "norm-surprisal", "norm-entropy", "tangent")]  # each [N, L]
        scores = (*estimates, own, -own)  # each [N, L]
        best = exact.argmax(1)  # [N]
        agree = [(score.masked_fill(~masked, -math.inf).argmax(1) == best).float().mean().item() for score in scores]
        print(f"{task.name:<11}{len(states):>8}" + "".join(f"{a:>{w}.0%}" for a, w in zip(agree, (8, 14, 8, 9, 16, 17))))


def where_failures_begin(instances, train_seed=0):
    """Adaptive BoE's failed decodings (seed-0 models unless told): the first step after which no valid answer
    agrees with the row, and whether BoE picked at that step or the entropy bound alone revealed; the bound's
    own failures beside, on the same instances."""
    print(f"\nWhere adaptive BoE's failed decodings go wrong ({instances} evaluation instances, seed-{train_seed} "
          f"models): the first step that leaves no valid answer, a step where BoE picked or one where the bound "
          f"alone revealed")
    print(f"{'task':<11}{'failed':>8}{'at a pick':>11}{'bound alone':>13}{'entropy-bound failed':>22}")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        model = suite_model(task, train_seed)
        cap = answer_length(prompts, task)
        picked = []  # per step, bool [n]: the rows where BoE picked

        def record_picks(tokens, masked, logits, scores):
            picked.append((scores == math.inf).any(1))

        with watching_boe_step(record_picks):
            tokens, decoding = boe.generate(model, prompts, cap, "boe-adaptive")
        at_pick = alone = 0
        for i in torch.nonzero(~task.check(prompts, tokens)).flatten().tolist():
            step = decoding["reveal_step"][i]  # [L]
            for t in range(int(step.max()) + 1):
                state = torch.where((step >= 0) & (step <= t), tokens[i], prompts[i])  # [L] the row after step t
                if not tasks.completable(task, prompts[i:i + 1], state[None])[0]:
                    at_pick, alone = at_pick + bool(picked[t][i]), alone + (not picked[t][i])
                    break
        bound_failed = (~task.check(prompts, boe.generate(model, prompts, cap, "entropy-bound")[0])).sum()
        print(f"{task.name:<11}{at_pick + alone:>8}{at_pick:>11}{alone:>13}{int(bound_failed):>22}")


def waiting_shares(model, prompts, bound=0.1):
    """At the first step of `prompts` [n, L]: the near-certain tokens (bool [n, L]: the entropy bound's set less
    its free token, the most uncertain one), the others still masked (bool [n, L]), and the share of the
    others' entropy [n] that goes when the near-certain tokens alone are revealed (at their argmax, one more
    forward), exactly and as predicted to first order from the state's gradient: the tangent -<g_j, delta_j>
    summed over the revealed tokens j, with the others as probes (the quantity BoE's one backward sees)."""
    masked = prompts == model.mask_id  # [n, L]
    with torch.no_grad():
        logits, probs = boe.predict(model, prompts)  # [n, L, V]
    own = boe.entropy(probs)  # [n, L]
    admitted = boe.entropy_bound_count(own, masked, bound)  # [n]
    positions, valid = boe.top_masked(-own, masked, (admitted - 1).clamp_min(0))  # [n, K] least uncertain first
    near = torch.zeros_like(masked).scatter(1, positions, valid)  # [n, L]
    others = masked & ~near  # [n, L]
    before = (own * others).sum(1)  # [n]
    with torch.no_grad():
        after = boe.entropy(boe.predict(model, torch.where(near, logits.argmax(-1), prompts))[1])  # [n, L]
    exact = (before - (after * others).sum(1)) / before  # [n]; NaN where nothing is left uncertain
    _, grad = boe.entropy_gradient(model.forward_embeds, model.embed(prompts), others, model.mask_id)  # [n, L, D]
    table = model.token_embedding.weight.detach()  # [V, D]
    delta = table[logits.argmax(-1)] - table[model.mask_id]  # [n, L, D]
    predicted = (-(grad * delta).sum(-1) * near).sum(1) / before  # [n]
    return near, others, exact, predicted


def waiting_study(instances, train_seed=0, bound=0.1):
    """Whether waiting tells the two kinds of uncertainty apart: at the first step, revealing the near-certain
    tokens alone settles uncertainty that is the model's own where the model can work the rest out from them,
    and cannot settle a free choice, which nothing they say decides. And whether BoE's one backward could see
    it: the first-order prediction of the same share, and its correlation with the exact one across states."""
    print(f"\nWaiting at the first step (gamma {bound}, seed-{train_seed} models, evaluation instances with both "
          f"near-certain and uncertain tokens): the share of the uncertain tokens' entropy that revealing the "
          f"near-certain ones alone removes, exactly (one more forward) and to first order (the state's gradient)")
    print(f"{'task':<11}{'states':>8}{'near-certain':>14}{'uncertain':>11}{'share gone':>12}{'predicted':>11}"
          f"{'correlation':>13}")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        near, others, exact, predicted = waiting_shares(suite_model(task, train_seed), prompts, bound)
        rows = near.any(1) & others.any(1)  # [n]
        pair = torch.stack([exact[rows], predicted[rows]])  # [2, N]
        correlation = torch.corrcoef(pair)[0, 1].item() if rows.sum() > 1 else math.nan
        print(f"{task.name:<11}{int(rows.sum()):>8}{near[rows].sum(1).float().mean():>14.1f}"
              f"{others[rows].sum(1).float().mean():>11.1f}{exact[rows].mean():>12.3f}{predicted[rows].mean():>11.3f}"
              f"{correlation:>13.2f}")


def look_first(model, cfg, counts):
    """Fixed-schedule BoE that looks before it picks: where near-certain tokens alone (the entropy bound's set
    less its free token) could fill the step's budget, one more forward with them revealed says whether
    waiting settles anything, that is whether the bound, over the other masked positions, then admits more
    of them than it does now; if so the step goes by confidence and BoE does not pick. Elsewhere it is `boe`.
    The look's forward is charged; `counts` (long [B] each) gets BoE's backwards (which an order rule cannot
    charge itself), the looks, and the looks that waited."""

    def score_look_first(s):
        own = boe.entropy(s.probs)  # [B, L]
        n_open = s.masked.sum(1)  # [B]
        admitted = boe.entropy_bound_count(own, s.masked, cfg.entropy_bound)  # [B]
        may_pick = (s.budget >= 2) & (s.budget < n_open) & (admitted < n_open)  # [B] where boe would pick
        look = may_pick & (admitted - 1 >= s.budget)  # [B]
        wait = torch.zeros_like(look)  # [B]
        if look.any():
            positions, valid = boe.top_masked(-own, s.masked, (admitted - 1).clamp_min(0))  # [B, K]
            near = torch.zeros_like(s.masked).scatter(1, positions, valid)  # [B, L]
            rows = look.nonzero().flatten()  # [b]
            others = (s.masked & ~near)[rows]  # [b, L]
            with torch.no_grad():
                after = boe.predict(model, torch.where(near, s.probs.argmax(-1), s.tokens)[rows])[1]  # [b, L, V]
            # the bound over the other masked positions, after the look against now
            wait[rows] = (boe.entropy_bound_count(boe.entropy(after), others, cfg.entropy_bound)
                          > boe.entropy_bound_count(own[rows], others, cfg.entropy_bound))
            s.forwards += look
        scores = s.probs.max(-1).values  # [B, L] confidence
        rows = (may_pick & ~wait).nonzero().flatten()  # [b]
        if len(rows):
            _, picked, _, charged = boe.boe_step(s.tokens[rows], s.masked[rows], s.budget[rows],
                                                 model.token_embedding.weight, model.forward_embeds, model.mask_id,
                                                 cfg, s.progress)
            scores[rows] = picked
            counts["backwards"][rows] += charged
        counts["looks"] += look
        counts["waits"] += wait
        return scores

    return score_look_first


def decode_looking_first(model, prompts, steps, cfg):
    """look_first's decoding of `prompts` [n, L]: the tokens, generate's record with BoE's backwards in it (an
    order rule cannot charge them; generate records none), and the rule's counts."""
    counts = {name: torch.zeros(len(prompts), dtype=torch.long) for name in ("backwards", "looks", "waits")}
    tokens, record = boe.generate(model, prompts, steps, look_first(model, cfg, counts), cfg)
    record["backwards"] = counts["backwards"]
    return tokens, record, counts


def look_study(instances, train_seed=0):
    """Whether BoE's losses where the uncertainty is the model's own are the guesses that waiting avoids:
    fixed-schedule BoE against the same with a look before each pick (look_first), and confidence."""
    cfg = boe.SamplerConfig()
    print(f"\nLooking before a pick (fixed schedule, seed-{train_seed} models, {instances} evaluation instances): "
          f"accuracy and fwd-equiv; looks an instance, and the share of them that waited")
    print(f"{'task':<11}{'steps':>6}{'confidence':>16}{'boe':>16}{'boe, looking first':>20}{'looks':>7}{'waited':>8}")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        solved = lambda tokens: task.check(prompts, tokens)  # noqa: E731
        model = suite_model(task, train_seed)
        for steps in task.steps[:-1]:
            plain = [evaluate(model, prompts, "", "", order, steps, cfg, solved) for order in ("confidence", "boe")]
            tokens, record, counts = decode_looking_first(model, prompts, steps, cfg)
            fwd_equiv = (record["forwards"] + cfg.backward_cost * record["backwards"]).float().mean().item()
            looks, waits = int(counts["looks"].sum()), int(counts["waits"].sum())
            print(f"{task.name:<11}{steps:>6}" + "".join(f"{r['accuracy']:>10.3f}{r['fwd_equiv']:>6.2f}" for r in plain)
                  + f"{solved(tokens).float().mean():>14.3f}{fwd_equiv:>6.2f}{looks / instances:>7.2f}"
                  + f"{waits / max(looks, 1):>8.2f}", flush=True)


def pick_successors(model, prompts, cap, cfg):
    """The states where adaptive BoE picks, along its own decodings of `prompts` [n, L] (cap steps): each
    state [N, L], the state with BoE's pick committed, and with the entropy bound's own token (the least
    uncertain masked position, which the step reveals where BoE does not pick) committed instead, [N, L]
    each; both at their argmax, one reveal a step either way."""
    seen = []

    def record(tokens, masked, logits, scores):
        rows = (scores == math.inf).any(1)  # [B] rows that picked
        if rows.any():
            seen.append((tokens[rows], logits[rows], (scores[rows] == math.inf).float().argmax(1)))

    with watching_boe_step(record):
        boe.generate(model, prompts, cap, "boe-adaptive", cfg)
    if not seen:
        empty = prompts[:0]  # [0, L]
        return empty, empty, empty
    states, logits, pick = (torch.cat(parts) for parts in zip(*seen))  # [N, L], [N, L, V], [N]
    own = boe.entropy(logits.softmax(-1)).masked_fill(states != model.mask_id, math.inf)  # [N, L]
    rows = torch.arange(len(states))  # [N]
    successors = []
    for position in (pick, own.argmin(1)):  # BoE's pick, the bound's token
        successor = states.clone()  # [N, L]
        successor[rows, position] = logits[rows, position].argmax(-1)
        successors.append(successor)
    return states, *successors


def narrowing_study(instances, train_seed=0):
    """What adaptive BoE's pick does to the rest of the decoding: at the steps where it picks, the state with
    its pick committed against the state with the bound's own token committed, each then finished by the
    entropy bound. The pick is BoE's estimate of the reveal that most lowers the others' entropy, so it should
    narrow the answers left the most; whether the model then finishes a narrower state as often is the question."""
    cfg = boe.SamplerConfig()
    print(f"\nAdaptive BoE's pick against the bound's own token at the same step, each state finished by the entropy "
          f"bound (seed-{train_seed} models, {instances} evaluation instances, gamma {cfg.entropy_bound}; at states "
          f"still completable where the two differ): share solved, valid answers left, forwards to finish")
    print(f"{'task':<11}{'states':>8}{'solved: pick':>14}{'bound':>7}{'answers: before':>17}{'pick':>6}{'bound':>7}"
          f"{'forwards: pick':>16}{'bound':>7}")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        model = suite_model(task, train_seed)
        cap = answer_length(prompts, task)
        states, after_pick, after_bound = pick_successors(model, prompts, cap, cfg)
        before = tasks.completions(task, states, states)  # [N]; a state's revealed tokens extend its prompt
        keep = (before > 0) & (after_pick != after_bound).any(1)  # [N]
        states, before = states[keep], before[keep]
        line = f"{task.name:<11}{len(states):>8}"
        if not len(states):
            print(line)
            continue
        solved, answers, forwards = [], [], []
        for successor in (after_pick[keep], after_bound[keep]):
            tokens, record = boe.generate(model, successor, cap, "entropy-bound", cfg)
            solved.append(task.check(states, tokens).float().mean().item())
            answers.append(tasks.completions(task, states, successor).float().mean().item())
            forwards.append(record["forwards"].float().mean().item())
        print(line + f"{solved[0]:>14.3f}{solved[1]:>7.3f}{before.float().mean():>17.2f}{answers[0]:>6.2f}"
              f"{answers[1]:>7.2f}{forwards[0]:>16.2f}{forwards[1]:>7.2f}", flush=True)


def exact_pick_adaptive(cfg, picks):
    """boe-adaptive with a perfect estimate: where it would pick (the bound admits one token, and enough
    positions are masked for a pick to pay), the masked position whose reveal lowers the other masked
    positions' entropy most, found by the exact lookahead (pure-future form); elsewhere the bound's order.
    The search's forwards are not charged (this measures what a pick buys, not what it costs); `picks`
    (long [B]) counts each row's picks."""

    def score_exact_pick(s):
        own = boe.entropy(s.probs)  # [B, L]
        count = boe.entropy_bound_count(own, s.masked, cfg.entropy_bound)  # [B]
        n_masked = s.masked.sum(1)  # [B]
        stuck = (count <= 1) & (n_masked - 2 > cfg.backward_cost)  # [B] where boe-adaptive picks
        if not stuck.any():
            return -own, count
        positions, valid = boe.top_masked(-own, s.masked, n_masked)  # [B, K]
        decoding_forwards = s.forwards.clone()  # [B]
        costs = lookahead_costs(s, positions, valid & stuck[:, None], own_entropy=False)  # [B, K]
        s.forwards.copy_(decoding_forwards)  # the search is not charged
        pick = positions.gather(1, costs.argmin(1, keepdim=True))  # [B, 1]
        picks.add_(stuck)
        return (-own).masked_fill(torch.zeros_like(s.masked).scatter(1, pick, stuck[:, None]), math.inf), count

    return score_exact_pick


def pick_value(instances):
    """What a pick buys, per task and model: the forwards adaptive BoE saves against the entropy bound per
    pick (a pick buys nothing else: a token revealed alone makes no dependence error), and the same with
    the pick made by the exact lookahead, the best any estimate of the one-step drop could do. A pick pays
    where it saves more forwards than its backward costs."""
    cfg = boe.SamplerConfig()
    print(f"\nWhat a pick buys ({instances} evaluation instances, gamma {cfg.entropy_bound}): accuracy, forwards an "
          f"instance, picks an instance, and forwards saved against the bound per pick (a backward costs "
          f"{cfg.backward_cost:g})")
    print(f"{'':<18}{'entropy bound':>14}{'adaptive BoE':>30}{'the exact pick':>30}")
    print(f"{'task':<11}{'model':<7}{'acc':>7}{'fwd':>7}" + f"{'acc':>8}{'fwd':>7}{'picks':>7}{'saved':>8}" * 2)
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        solved = lambda tokens: task.check(prompts, tokens)  # noqa: E731
        cap = answer_length(prompts, task)
        for seed in SEEDS:
            model = suite_model(task, seed)
            exact_picks = torch.zeros(instances, dtype=torch.long)  # [n]
            bound, adaptive, exact = (evaluate(model, prompts, "", "", order, cap, cfg, solved) for order in
                                      ("entropy-bound", "boe-adaptive", exact_pick_adaptive(cfg, exact_picks)))
            line = f"{task.name:<11}{seed:<7}{bound['accuracy']:>7.3f}{bound['forwards']:>7.2f}"
            for row, n_picks in ((adaptive, adaptive["backwards"]), (exact, exact_picks.float().mean().item())):
                saved = (bound["forwards"] - row["forwards"]) / n_picks if n_picks else math.nan
                line += f"{row['accuracy']:>8.3f}{row['forwards']:>7.2f}{n_picks:>7.2f}{saved:>8.2f}"
            print(line, flush=True)


def picks(instances, train_seed=0):
    pick_study(instances, train_seed)
    stuck_choices(instances, train_seed)
    where_failures_begin(instances, train_seed)
    waiting_study(instances, train_seed)
    look_study(instances, train_seed)
    narrowing_study(instances, train_seed)
    first_picks(instances)
    pick_value(instances)


# -----------------------------------------------------------------------------
# How well TIS ranks its candidates (built-in task)


@torch.no_grad()
def reveal_drops(model, context, reveal_embeds, positions, valid, probes):
    """For each candidate i (two forwards each): the drop of the probes' entropy when e_i moves from
    E[MASK] to reveal_embeds[i] [B, L, D], every other position keeping its embedding in `context`
    [B, L, D]. With the context at TIS's linearisation point, the tangent expands exactly this drop."""
    rows = torch.arange(len(positions), device=positions.device)  # [B]
    mask_embedding = model.token_embedding.weight[model.mask_id]  # [D]

    def probe_entropy(embeds):
        logits = model.forward_embeds(embeds).float()  # [B, L, V]
        logits[..., model.mask_id] = -math.inf
        return (boe.entropy(logits.softmax(-1)) * probes).sum(1)  # [B]

    drops = torch.zeros(positions.shape, device=positions.device)  # [B, K]
    for k in range(positions.shape[1]):
        pos = positions[:, k]  # [B]
        before, after = context.clone(), context.clone()  # [B, L, D] each
        before[rows, pos] = mask_embedding
        after[rows, pos] = reveal_embeds[rows, pos]
        drops[:, k] = probe_entropy(before) - probe_entropy(after)
    return drops.masked_fill(~valid, 0.0)  # [B, K]


# The rankings tis_fidelity compares, in pairs that walk from BoE's estimate to the exact lookahead.
FIDELITY_PAIRS = (("estimate", "target"), ("target", "alone"), ("alone", "hard"), ("estimate", "lookahead"))


def spearman(a, b):
    """Spearman's rank correlation of two score vectors [k] (ties ranked in order of position): the Pearson
    correlation of their ranks."""
    ra, rb = (x.argsort(-1).argsort(-1).double() for x in (a, b))  # [k], [k] ranks 0 .. k-1
    ra, rb = ra - ra.mean(), rb - rb.mean()  # [k], [k]
    return ((ra * rb).sum() / (ra.norm() * rb.norm())).item()


def tis_fidelity(model, prompts, steps_list, cfg):
    """How well BoE's estimate ranks its candidates along its own decodings (one per budget in
    steps_list), over the decisions that use it with at least 3 candidates: the mean Spearman
    correlation of two rankings, and how often their top choices agree. The exact references, each
    measured with one or two forwards per candidate:
      target     drop of the probes' entropy when candidate i moves from E[MASK] to its reveal, every
                 other position as at the linearisation point: what the tangent expands to first
                 order, so estimate vs target is the error of the expansion (and of the active rows)
      alone      the same drop with the other candidates masked, as in x_t: target vs alone is the
                 effect of softening every candidate at once (none at the state, where target = alone)
      hard       drop of the other probes' entropy when candidate i is revealed (argmax) in x_t: alone
                 vs hard is the error of relaxing a reveal into embedding space, and at the state also
                 of counting i's own entropy, which is a probe there and still in the cost
      lookahead  what the exact lookahead ranks by, H_i + the entropy left on the other masked
                 positions: estimate vs lookahead is the error of the whole approximation"""
    results = {pair: ([], []) for pair in FIDELITY_PAIRS}  # pair -> (correlations, agreements)
    table = model.token_embedding.weight.detach()  # [V, D]

    def score_and_compare(s):
        logits, _, candidates, picks, influence, charged = boe.boe_influence(s.tokens, s.masked, s.budget, table,
                                                                             model.forward_embeds, model.mask_id, cfg)
        positions, valid = boe.top_masked(candidates.float(), candidates, candidates.sum(1))  # [B, K]
        valid &= charged[:, None]  # [B, K] decisions that used the estimate
        at_state = cfg.linearize == "state"
        probes = s.masked if at_state else boe.surrogate_probes(logits, s.masked, candidates, cfg)
        reveal_embeds = boe.reveal_embeddings(logits, table, cfg).to(table.dtype)  # [B, L, D]
        state = model.embed(s.tokens)  # [B, L, D]
        point = state if at_state else torch.where(candidates[..., None], reveal_embeds, state)  # [B, L, D]
        scores = dict(  # name -> [B, K], larger = better candidate
            estimate=influence.gather(1, positions),
            target=reveal_drops(model, point, reveal_embeds, positions, valid, probes),
            hard=-lookahead_costs(s, positions, valid, probes, own_entropy=False),
            lookahead=-lookahead_costs(s, positions, valid))
        scores["alone"] = (scores["target"] if at_state
                           else reveal_drops(model, state, reveal_embeds, positions, valid, probes))
        for row in torch.nonzero(valid.sum(1) >= 3).flatten().tolist():
            for pair in FIDELITY_PAIRS:
                if at_state and pair == ("target", "alone"):
                    continue
                a, b = (scores[name][row, valid[row]] for name in pair)  # [k], [k]
                results[pair][0].append(spearman(a, b))
                results[pair][1].append(bool(a.argmax() == b.argmax()))
        # Decode on as generate's "boe" would: the picks by BoE's score, the rest by confidence.
        probs = logits.softmax(-1)  # [B, L, V]
        score = boe.boe_scores(influence, candidates, probs.max(-1).values, boe.entropy(probs), s.progress, cfg)
        chosen_pos, chosen_valid = boe.top_masked(score, candidates, picks)  # [B, K]
        chosen = torch.zeros_like(candidates).scatter(1, chosen_pos, chosen_valid)  # [B, L]
        return torch.where(chosen, math.inf, probs.max(-1).values)  # [B, L]

    for steps in steps_list:
        boe.generate(model, prompts, steps, score_and_compare, cfg)
    summary = dict(decisions=len(results[FIDELITY_PAIRS[0]][0]))
    for pair, (correlations, agreements) in results.items():  # None where there was no decision
        n = len(correlations)
        summary[pair] = (sum(correlations) / n, sum(agreements) / n) if n else None
    return summary


def fidelity(instances):
    model = suite_model(tasks.MARKS, 0)
    prompts, _ = boe.make_instances(instances, seed=1)
    steps_list = tasks.MARKS.steps
    print(f"How BoE's estimate ranks its candidates against exact one-step drops ({instances} instances, "
          f"decodings at steps {list(steps_list)}): mean Spearman, how often the top choices agree")
    print(f"{'':<20}{'decisions':>10}" + "".join(f"{a + ' vs ' + b:>22}" for a, b in FIDELITY_PAIRS))
    configs = [(f"boe ({estimator})", boe.SamplerConfig(estimator=estimator))
               for estimator in ("norm-surprisal", "norm-entropy", "norm", "tangent")]
    for label, cfg in configs + [("boe (paper)", boe.PAPER_BOE)]:
        fid = tis_fidelity(model, prompts, steps_list, cfg)
        print(f"{label:<20}{fid['decisions']:>10}" + "".join(
            f"{'n/a':>22}" if fid[pair] is None else f"{fid[pair][0]:+16.2f} {fid[pair][1]:5.0%}"
            for pair in FIDELITY_PAIRS))


# -----------------------------------------------------------------------------
# Ablations, one decoding side by side, the backward's measured cost


def ablation_rows(cfg):
    """(label, order, config) rows that take BoE and the lookahead apart."""
    return [
        ("lookahead (future only)", lookahead(own_entropy=False), cfg),
        ("lookahead (K=4)", lookahead(k=4), cfg),
        ("boe", "boe", cfg),
        ("boe (|g| H)", "boe", replace(cfg, estimator="norm-entropy")),
        ("boe (|g| alone)", "boe", replace(cfg, estimator="norm")),
        ("boe (tangent)", "boe", replace(cfg, estimator="tangent")),
        ("boe (tangent, soft)", "boe", replace(cfg, estimator="tangent", reveal="soft")),
        ("boe (whole budget)", "boe", replace(cfg, influential=0)),
        ("boe (2 influential)", "boe", replace(cfg, influential=2)),
        ("boe (tangent, whole budget)", "boe", replace(cfg, estimator="tangent", influential=0)),
        ("boe (no TIS)", "boe", replace(cfg, use_tis=False)),
        ("boe (no penalty)", "boe", replace(cfg, lam=0.0)),
        ("boe (gate, gamma=1)", "boe", replace(cfg, gamma=1.0)),
        ("boe (r=4)", "boe", replace(cfg, candidates=4)),
        ("boe (exact backward)", "boe", replace(cfg, sparse_backward=False)),
        ("boe (paper)", "boe", boe.PAPER_BOE),
        ("boe (paper, dense backward)", "boe", replace(boe.PAPER_BOE, sparse_backward=False)),
    ] + [(f"boe (paper, rho=1/{n})", "boe", replace(boe.PAPER_BOE, rho=1 / n)) for n in (8, 4, 2)]


def ablations(instances):
    model = suite_model(tasks.MARKS, 0)
    prompts, _ = boe.make_instances(instances, seed=1)
    steps_list = tasks.MARKS.steps
    print(f"Ablations on the built-in task ({instances} instances of seed 1): accuracy at steps {list(steps_list)}")
    for label, order, cfg in ablation_rows(boe.SamplerConfig()):
        rows = [evaluate(model, prompts, label, "", order, steps, cfg) for steps in steps_list]
        print(f"{label:<30}" + "".join(f"{row['accuracy']:>8.3f}" for row in rows))
    gamma = boe.SamplerConfig().entropy_bound
    for label, cfg in (("boe-adaptive", boe.SamplerConfig()),
                       ("boe-adaptive (pick always)", boe.SamplerConfig(adaptive_pick="always")),
                       ("boe-adaptive (backward free)", boe.SamplerConfig(backward_cost=0.0)),
                       ("boe-adaptive (|g| H)", boe.SamplerConfig(estimator="norm-entropy")),
                       ("boe-adaptive (|g| alone)", boe.SamplerConfig(estimator="norm")),
                       ("boe-adaptive (tangent)", boe.SamplerConfig(estimator="tangent")),
                       ("boe-adaptive (no TIS)", boe.SamplerConfig(use_tis=False)),
                       ("boe-adaptive (no TIS, always)", boe.SamplerConfig(use_tis=False, adaptive_pick="always"))):
        row = evaluate(model, prompts, label, "", "boe-adaptive", boe.SEQ_LEN - boe.PROMPT_LEN, cfg)
        print(f"{label + f', gamma {gamma}':<42}{row['accuracy']:>8.3f}  at {row['forwards']:.2f} forwards + "
              f"{row['backwards']:.2f} backwards")


def show(task_name, instance, steps):
    """One instance decoded by every rule, step by step, as text."""
    task = tasks.ALL_TASKS[task_name]
    model = suite_model(task, 0)
    prompts, _ = task.make_instances(instance + 1, seed=1)
    prompt = prompts[instance:]  # [1, L]
    cap = answer_length(prompt, task)
    print(f"{task_name} instance {instance} of seed 1 ('_' = [MASK]); fixed-schedule rules at {steps} steps")
    default = boe.SamplerConfig()
    for label, order, n_steps, cfg in [(label, order, steps, default) for label, order in FIXED_RULES.items()] + [
            ("boe (paper)", "boe", steps, boe.PAPER_BOE), ("entropy-bound", "entropy-bound", cap, default),
            ("threshold", "threshold", cap, default), ("boe-adaptive", "boe-adaptive", cap, default)]:
        tokens, record = boe.generate(model, prompt, n_steps, order, cfg)
        last = int(record["reveal_step"][0].max())
        print(f"\n{label}: {'solved' if task.check(prompt, tokens)[0] else 'NOT solved'}, "
              f"{int(record['forwards'][0])} forwards, {int(record['backwards'][0])} backwards")
        for t in range(last + 1):
            state = torch.where(record["reveal_step"][0] <= t, tokens[0], prompt[0])  # [L]
            revealed = torch.nonzero(record["reveal_step"][0] == t).flatten().tolist()
            shown = "".join(task.chars[token] for token in state.tolist())
            print(f"  step {t + 1}: {shown}   revealed positions {revealed}")


def backward_cost(model, prompts, sparse, repeats=15):
    """What BoE's pass costs beyond a plain forward, in forwards: a forward with gradient tracking and one
    backward, against a forward under no_grad, on this model and batch, timed back to back `repeats` times;
    the median ratio, which a drift of the machine's speed between the two cannot bias."""
    masked = prompts == model.mask_id  # [B, L]
    embeds = model.embed(prompts).detach()  # [B, L, D]

    def forward():
        with torch.no_grad():
            boe.predict(model, prompts)

    def forward_backward():
        boe.entropy_gradient(model.forward_embeds, embeds, masked, model.mask_id, masked if sparse else None)

    forward(), forward_backward()  # warm-up
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        middle = time.perf_counter()
        forward_backward()
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return max(sorted(ratios)[len(ratios) // 2] - 1, 0.0)


def time_backward(instances=512):
    print(f"BoE's backward beyond a plain forward, in forwards (batch {instances}, median of 15; boe.py counts "
          f"{BACKWARD_COST:g}):")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        model = suite_model(task, 0)
        print(f"  {task.name:<10} active rows {backward_cost(model, prompts, True):.2f}   dense "
              f"{backward_cost(model, prompts, False):.2f}")


@torch.no_grad()
def model_loss(instances=2000):
    """Each shipped model's training objective (the masked-diffusion bound on -log p(answer), per answer
    position) on tuning instances: where training stopped. On the built-in task the least it can be is
    the entropy of the free choice, E[log k] / 9 nats a position (k open cells, 9 answer positions)."""
    print(f"Masked-diffusion loss per answer position on {instances} tuning instances (seed 0), each model:")
    for task in tasks.ALL_TASKS.values():
        prompts, answers = task.make_instances(instances, seed=0)
        losses = []
        for seed in SEEDS:
            model = suite_model(task, seed)
            gen = torch.Generator().manual_seed(0)  # the same masks for every model
            losses.append(sum(boe.masked_diffusion_loss(model, prompts, answers, gen).item() for _ in range(4)) / 4)
        floor = ""
        if task is tasks.MARKS:
            open_cells = (prompts[:, : boe.N_CELLS] == boe.OPEN).sum(1).double()  # [n]
            floor = f"   (floor: {open_cells.log().mean().item() / (boe.SEQ_LEN - boe.PROMPT_LEN):.4f})"
        print(f"  {task.name:<10} {task.train_steps:>6} training steps   " +
              "  ".join(f"seed {seed} {loss:.4f}" for seed, loss in zip(SEEDS, losses)) + floor)


@torch.no_grad()
def weight_noise(instances, scales=(1e-6, 1e-5, 1e-4)):
    """How far the tables hold on another machine. Another CPU or PyTorch rounds float sums differently, by
    about float32's 6e-8 relative per operation; here every weight of each task's seed-0 model is instead
    multiplied by 1 + scale * N(0, 1), and each rule decodes the same evaluation instances again: how many
    decodings change, and the accuracy before and after."""
    default = boe.SamplerConfig()
    print(f"Decodings that change when every weight is scaled by 1 + s N(0, 1), of {instances} evaluation "
          f"instances (seed 1), seed-0 models; accuracy before -> after")
    for task in tasks.ALL_TASKS.values():
        prompts, _ = task.make_instances(instances, seed=1)
        accuracy = lambda tokens: task.check(prompts, tokens).double().mean().item()  # noqa: E731
        cap = answer_length(prompts, task)
        rules = [(order, steps, f"{steps} steps") for order in ("boe", "confidence") for steps in task.steps[:-1]]
        rules += [("boe-adaptive", cap, f"gamma {default.entropy_bound:g}"),
                  ("entropy-bound", cap, f"gamma {default.entropy_bound:g}"),
                  ("threshold", cap, f"tau {default.confidence_threshold:g}")]
        decoded = []  # for each scale (0 first), the tokens [n, L] of each rule
        for scale in (0.0, *scales):
            model = suite_model(task, 0)
            torch.manual_seed(0)
            for weight in model.parameters():
                weight.mul_(1 + scale * torch.randn_like(weight))
            decoded.append([boe.generate(model, prompts, steps, order)[0] for order, steps, _ in rules])
        print(f"\n{task.name}\n  {'rule':<24}" + "".join(f"{f's = {s:g}':>22}" for s in scales))
        for i, (order, _, setting) in enumerate(rules):
            before = decoded[0][i]  # [n, L]
            cells = [f"{int((after[i] != before).any(1).sum())} ({accuracy(before):.3f} -> {accuracy(after[i]):.3f})"
                     for after in decoded[1:]]
            print(f"  {order + ' ' + setting:<24}" + "".join(f"{cell:>22}" for cell in cells))


def precision(instances):
    """The built-in task's seed-0 model run in float32, bfloat16 and float16 (weights and activations; BoE
    takes its softmax, entropies and scores in float32 whatever the model's dtype): the main rules' accuracy
    and fwd-equiv in each."""
    prompts, _ = boe.make_instances(instances, seed=1)
    cap = answer_length(prompts, tasks.MARKS)
    rules = [(order, steps, f"{steps} steps") for order in ("confidence", "boe") for steps in tasks.MARKS.steps[:-1]]
    rules += [(order, cap, f"gamma {boe.SamplerConfig.entropy_bound:g}") for order in ("entropy-bound", "boe-adaptive")]
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    print(f"The built-in task's seed-0 model in each dtype, {instances} evaluation instances (seed 1): "
          f"accuracy / fwd-equiv\n{'rule':<26}" + "".join(f"{str(dtype)[6:]:>18}" for dtype in dtypes))
    models = [suite_model(tasks.MARKS, 0).to(dtype) for dtype in dtypes]
    for order, steps, setting in rules:
        rows = [evaluate(model, prompts, order, setting, order, steps, boe.SamplerConfig()) for model in models]
        print(f"{order + ' ' + setting:<26}" + "".join(f"{row['accuracy']:>11.3f} / {row['fwd_equiv']:<4.2f}"
                                                       for row in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    suite = commands.add_parser("suite", help="every rule on every task, over the trained models")
    suite.add_argument("--quick", action="store_true", help="one model a task (the first of --train-seeds), "
                       "40 instances, two budgets (for CI)")
    suite.add_argument("--tasks", nargs="+", default=list(tasks.ALL_TASKS), choices=list(tasks.ALL_TASKS))
    suite.add_argument("--plot", metavar="DIR", help="also write DIR/frontier-TASK.png (needs matplotlib)")
    suite.add_argument("--json", metavar="PATH", help="also write every row of every model as JSON")
    suite.add_argument("--temperature", type=float, default=0.0, help="every rule commits a sample from "
                       "p ** (1 / T); 0 = the argmax (the README's tables)")
    seeds_help = ("training seeds of the models (default 0 1 2, the shipped ones); a model not in weights/ is "
                  "trained first, 2 to 15 minutes on one core")
    suite.add_argument("--train-seeds", type=int, nargs="+", default=list(SEEDS), help=seeds_help)
    for name, default, what in (
            ("tune", TUNING, "the grid search behind BoE's defaults, on tuning instances (seed 0)"),
            ("picks", 300, "how often BoE's pick is wrong, which token it picks where the bound is stuck, "
                           "whether waiting settles the uncertainty, what a pick does to the rest, and how many "
                           "forwards it saves"),
            ("fidelity", 250, "how well TIS ranks reveals against their exact entropy drops"),
            ("ablations", INSTANCES, "BoE with one of its choices changed at a time"),
            ("noise", INSTANCES, "how many decodings tiny changes to the weights change"),
            ("time-backward", 512, "the measured cost of BoE's backward, in forwards"),
            ("loss", 2000, "each model's training loss, and the built-in task's floor"),
            ("precision", 500, "the built-in task's model in float32, bfloat16 and float16")):
        commands.add_parser(name, help=what).add_argument("--instances", type=int, default=default,
                                                          help=f"how many instances (default {default})")
    commands.choices["picks"].add_argument("--train-seed", type=int, default=0, help="training seed of the models "
                                           "of the first six studies (default 0; the last two use 0, 1 and 2)")
    show_args = commands.add_parser("show", help="one decoding by every rule")
    show_args.add_argument("instance", type=int)
    show_args.add_argument("--task", default="marks", choices=list(tasks.ALL_TASKS))
    show_args.add_argument("--steps", type=int, default=3, help="budget of the fixed-schedule rules")
    train_args = commands.add_parser("train", help="train every model of the suite that is missing")
    train_args.add_argument("--retrain", action="store_true", help="train every model again, also where its "
                            "weights are valid")
    train_args.add_argument("--train-seeds", type=int, nargs="+", default=list(SEEDS), help=seeds_help)
    args = parser.parse_args()
    if "" in (getattr(args, "json", None), getattr(args, "plot", None)):
        parser.error("--json and --plot need a path")
    if getattr(args, "instances", 1) < 1 or getattr(args, "instance", 0) < 0 or getattr(args, "steps", 1) < 1:
        parser.error("--instances and --steps must be >= 1, INSTANCE >= 0")
    if getattr(args, "instances", 1) > 10**4:  # each rule decodes them as one batch
        parser.error("--instances must be at most 10**4 (the tables use 1000)")
    if getattr(args, "instance", 0) >= 10**6:
        parser.error("INSTANCE must be below 10**6")
    train_seeds = getattr(args, "train_seeds", [getattr(args, "train_seed", 0)])
    if not all(0 <= seed < 10**12 for seed in train_seeds):  # boe.train's data seeds, as in boe.py
        parser.error(f"training seeds must be in [0, 10**12); got {train_seeds}")
    try:  # what the suite writes at its end: an error now, not after the run
        if getattr(args, "json", None):
            check_writable(args.json)
        if getattr(args, "plot", None):
            check_writable(os.path.join(args.plot, "frontier.png"))
    except OSError as err:
        parser.error(str(err))
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib")

    if args.command == "suite":
        seeds = list(dict.fromkeys(args.train_seeds))  # each model once, in the order given
        seeds, instances, steps = (seeds[:1], 40, (2, 3)) if args.quick else (seeds, INSTANCES, None)
        tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
        if not 0 <= args.temperature <= big or 0 < args.temperature < tiny:
            parser.error(f"--temperature must be 0 or from {tiny:.3g} to {big:.3g}; got {args.temperature}")
        results = run_suite(args.tasks, seeds, instances, steps, args.temperature)
        print_suite(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({name: list(by_rule.values()) for name, by_rule in results.items()}, f, indent=1)
        if args.plot:
            plot_suite(results, args.plot)
    elif args.command == "train":
        for task in tasks.ALL_TASKS.values():
            for seed in dict.fromkeys(args.train_seeds):
                suite_model(task, seed, args.retrain)
    elif args.command == "picks":
        picks(args.instances, args.train_seed)
    elif args.command == "show":
        show(args.task, args.instance, args.steps)
    else:
        dict(tune=tune, fidelity=fidelity, ablations=ablations, noise=weight_noise, loss=model_loss,
             precision=precision, **{"time-backward": time_backward})[args.command](args.instances)


if __name__ == "__main__":
    main()
