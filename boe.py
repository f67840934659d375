"""Backward-on-Entropy (BoE) steering for masked diffusion models, in one file.

A reference implementation of the sampler of "TABES: Trajectory-Aware Backward-on-Entropy Steering
for Masked Diffusion Models" (Saini et al., arXiv 2602.00250). A masked diffusion model (MDM)
generates by revealing [MASK] positions over a few steps. Usual samplers reveal what the model is
most confident about; BoE reveals the positions whose reveal most lowers the uncertainty the model
has left, estimated for every candidate at once from one backward pass: the Token Influence Score
(TIS). ActiveQueryAttention (attn_kernel.py) keeps that backward cheap.

Read top to bottom: 1. a tiny bidirectional transformer; 2. a task on which the order of reveals
matters, and training; 3. one decoding loop and its order rules; 4. the TIS derivation and `boe_step`,
one BoE step for any MDM; 5. the main job. [ours] marks a choice the paper leaves open, with the reason.
The checks that give bad input a clear error are in input_checks.py; the measurements behind the README
are in experiments.py.
"""
import argparse
import math
import numbers
import operator
import os
import time
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attn_kernel import active_query_attention
from input_checks import (call_logits_fn, check_boe_step_args, check_generate_args, check_logits,
                          check_model_output, check_rule_output)

# -----------------------------------------------------------------------------
# 1. Model: a tiny masked diffusion transformer


@dataclass
class ModelConfig:
    vocab_size: int = 14  # every token id the model reads or writes, [MASK] included
    mask_id: int = 13     # id of the [MASK] token
    seq_len: int = 18     # positions per sequence
    n_layer: int = 3      # transformer blocks
    n_head: int = 4       # attention heads per block
    d_model: int = 64     # width of the residual stream


# The ActiveQueryAttention backend (attn_kernel.py): "auto" = Triton for CUDA tensors (and on CPU under
# TRITON_INTERPRET=1, as in pytest), else pure PyTorch; "triton" or "torch" forces one.
ATTENTION_BACKEND = "auto"


def attention(q, k, v, active):
    """Bidirectional attention over [B, H, L, Dh] tensors. With `active` (bool [B, L]) the forward is
    unchanged but the gradient flows only through the outputs of active query rows (attn_kernel.py)."""
    if active is None:
        return F.scaled_dot_product_attention(q, k, v)  # [B, H, L, Dh]
    return active_query_attention(q, k, v, active, backend=ATTENTION_BACKEND)  # [B, H, L, Dh]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.ReLU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x, active):
        B, L, D = x.shape
        qkv = self.qkv(self.ln_attn(x)).view(B, L, 3, self.n_head, D // self.n_head)  # [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, Dh]
        heads = attention(q, k, v, active)  # [B, H, L, Dh]
        x = x + self.proj(heads.transpose(1, 2).reshape(B, L, D))  # [B, L, D]
        return x + self.mlp(self.ln_mlp(x))  # [B, L, D]


class MaskedDiffusionTransformer(nn.Module):
    """p_theta(x_0[i] | x_t) for every position i at once. `embed` and `forward_embeds` are split so that
    BoE can feed input embeddings of its own choosing and differentiate the output with respect to them."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.mask_id = cfg.mask_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Parameter(0.02 * torch.randn(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def embed(self, tokens):
        return self.token_embedding(tokens)  # [B, L, D]

    def forward_embeds(self, embeds, active=None):
        x = embeds + self.position_embedding[: embeds.shape[1]]  # [B, L, D]
        for block in self.blocks:
            x = block(x, active)  # [B, L, D]
        return self.head(self.ln_out(x))  # [B, L, V]

    def forward(self, tokens):
        return self.forward_embeds(self.embed(tokens))  # [B, L, V]


# -----------------------------------------------------------------------------
# 2. Task: "mark an open cell, then name it", and training
#
#     prompt  #..#.##.=_________     8 cells, open '.' or blocked '#'; '=' ends the prompt, '_' is [MASK]
#     answer  #..#.##.=--*-----3     '*' on one open cell, '-' elsewhere, then that cell's number (the pivot)
#
# Any open cell may be chosen; the checker accepts every consistent answer. Blocked cells' marks are
# certain, each of the k open cells' is '-' with probability 1 - 1/k, and the pivot is uniform over the
# open cells. So a confidence sampler reveals the pivot last, and with several reveals a step it commits
# the last open marks and the pivot together, each from its marginal: they usually disagree. Revealing
# the pivot early settles every mark. The decisive token is the least confident one, necessarily: a
# token that is a function of another is at least as confident as it. Its uncertainty is a free choice,
# not the model's ignorance; tasks.py adds tasks where it is the other way round.

N_CELLS = 8
BLOCKED, OPEN, UNMARKED, MARKED, SEP, MASK = 8, 9, 10, 11, 12, 13  # ids 0..7 are the cell numbers 1..8
PROMPT_LEN = N_CELLS + 1            # cells, then SEP
SEQ_LEN = PROMPT_LEN + N_CELLS + 1  # then marks, then the pivot
TOKEN_CHARS = "12345678#.-*=_"


def make_instances(n, seed):
    """n seeded instances, 3 to 8 open cells each: prompts and one valid answer each, [n, L] both."""
    gen = torch.Generator().manual_seed(seed)
    n_open = torch.randint(3, N_CELLS + 1, (n, 1), generator=gen)  # [n, 1]
    open_rank = torch.rand(n, N_CELLS, generator=gen).argsort(1).argsort(1)  # [n, N] random permutation
    is_open = open_rank < n_open  # [n, N] a random subset of n_open cells
    marked = open_rank.masked_fill(~is_open, N_CELLS).argmin(1)  # [n] the open cell of rank 0
    rows = torch.arange(n)  # [n]
    cells = torch.where(is_open, OPEN, BLOCKED)  # [n, N]
    marks = torch.full((n, N_CELLS), UNMARKED)  # [n, N]
    marks[rows, marked] = MARKED
    answers = torch.cat([cells, torch.full((n, 1), SEP), marks, marked[:, None]], 1)  # [n, L]
    prompts = answers.clone()  # [n, L]
    prompts[:, PROMPT_LEN:] = MASK
    return prompts, answers


def check(tokens):
    """True where a row is a valid answer: one '*', on an open cell, and the pivot names that cell."""
    cells, marks, pivot = tokens[:, :N_CELLS], tokens[:, PROMPT_LEN:-1], tokens[:, -1]  # [n, N], [n, N], [n]
    marks_ok = ((marks == UNMARKED) | (marks == MARKED)).all(1) & ((marks == MARKED).sum(1) == 1)  # [n]
    marked = (marks == MARKED).int().argmax(1)  # [n]
    return marks_ok & (cells[torch.arange(len(tokens)), marked] == OPEN) & (pivot == marked)  # [n]


@dataclass
class TrainConfig:
    steps: int = 10000        # optimizer steps (about 10 minutes on one CPU core): by then the loss is near its
                              # floor, the entropy of the free choice (3000 steps left it 20 % above)
    batch_size: int = 128     # sequences per step
    lr: float = 3e-3          # peak AdamW learning rate (cosine decay to 10 %)
    seed: int = 0             # seeds the weights and the training data
    # the shipped weights, next to this file, from whatever folder it runs
    cache: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "marks-seed0.pt")


def masked_diffusion_loss(model, prompts, answers, gen):
    """The MDM objective: mask each answer position (a [MASK] in the prompt) with probability
    t ~ U(0, 1), predict the masked ones, weight by 1/t. This bounds -log p(answer | prompt) from above
    (the ELBO of masked diffusion); prompt tokens are never masked."""
    t = torch.rand(len(answers), 1, generator=gen).clamp_min(1e-3)  # [n, 1]
    to_fill = prompts == model.mask_id  # [n, L]
    masked = (torch.rand(answers.shape, generator=gen) < t) & to_fill  # [n, L]
    logits = model(torch.where(masked, model.mask_id, answers))  # [n, L, V]
    nll = F.cross_entropy(logits.transpose(1, 2), answers, reduction="none")  # [n, L]
    return ((nll * masked) / t).sum() / to_fill.sum()


def train(model_cfg, train_cfg, make_batch=make_instances):
    """Train a model on batches from make_batch(n, seed) -> (prompts, answers) [n, L] each. On one CPU
    thread: the order of float sums changes with the thread count, and near convergence a different last
    bit grows into a different model; so retraining on the same machine gives the same weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(train_cfg.seed)
    model = MaskedDiffusionTransformer(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    start = time.time()
    try:
        for step in range(1, train_cfg.steps + 1):
            lr_scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / train_cfg.steps))
            for group in opt.param_groups:
                group["lr"] = train_cfg.lr * lr_scale
            # Fresh instances every step, from negative seeds: tuning uses seed 0, evaluation seed 1. The
            # built-in task has only 219 distinct prompts, so every prompt is seen in training; what the
            # evaluation measures is the sampler, not generalisation to new prompts.
            prompts, answers = make_batch(train_cfg.batch_size, seed=-(train_cfg.seed * 10**6 + step))
            loss = masked_diffusion_loss(model, prompts, answers, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 500 == 0 or step == train_cfg.steps:
                elapsed = time.time() - start
                print(f"train step {step:5d}/{train_cfg.steps}  loss {loss.item():.4f}  elapsed {elapsed:5.1f}s  "
                      f"eta {elapsed / step * (train_cfg.steps - step):5.1f}s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


# -----------------------------------------------------------------------------
# 3. Samplers: one decoding loop, many order rules
#
# Each step: one forward at the current state x_t; an order rule scores the masked positions; each row
# reveals its `budget` best-scoring ones and commits them for good (argmax, or a sample at a
# temperature). On the fixed schedule budget = ceil(masked / steps_left). Adaptive rules raise it from the
# step's forward, so `steps` is a cap for them (steps >= the masked positions leaves them free).
#   entropy-bound  (EB-sampler, Ben-Hamu et al., arXiv 2505.24857) reveals the longest run of masked
#       positions, in ascending entropy, whose entropies all but the largest sum to at most gamma
#       (cfg.entropy_bound, nats). Tokens revealed together are drawn each from its marginal; the error
#       against drawing them jointly (their total correlation) is at most that sum. A token drawn alone
#       makes no such error, so every step reveals at least one.
#   threshold  (Fast-dLLM, Wu et al., arXiv 2505.22618) reveals every masked position whose confidence is
#       at least tau (cfg.confidence_threshold), and the most confident one if none is.
# BoE runs the step's forward itself, so that one backward through it scores every position (section 4).


@dataclass(frozen=True)  # one default instance is shared; variants are made with dataclasses.replace()
class SamplerConfig:
    temperature: float = 0.0        # commit rule: 0 = argmax, > 0 = sample from p ** (1 / temperature)
    entropy_bound: float = 0.1      # gamma, nats: entropy-bound and boe-adaptive (the EB-sampler's usual value);
                                    # boe: no pick where the bound would reveal every masked position
    confidence_threshold: float = 0.9  # threshold: tau (Fast-dLLM's default)
    adaptive_pick: str = "stuck"    # boe-adaptive: BoE picks the free token only where the bound admits one
                                    # token ("stuck"), or at any step where a pick could pay ("always", an ablation)
    backward_cost: float = 2.0      # boe-adaptive: a backward's price in forwards, as the README's tables
                                    # charge it; BoE picks only where a pick could save more than that
    # BoE's knobs (section 4), chosen by experiments.py's grid search on tuning instances (seed 0) only
    linearize: str = "state"        # where g is taken: "state" = x_t, in the step's own forward;
                                    # "surrogate" = every candidate at its reveal's embedding (paper)
    reveal: str = "onehot"          # where a reveal moves e_i: "onehot" = E[argmax p]; "soft" = sum_v w(v) E[v] (paper)
    estimator: str = "norm-surprisal"  # influence from g: "tangent" (paper), "norm", "norm-surprisal",
                                    # "norm-entropy" (influence_scores; at the state the last three ignore `reveal`)
    candidates: int = 0             # r, candidates a step: most confident first, at least the budget; 0 = all masked
    influential: int = 1            # reveals a step chosen by score (fixed schedule: at most budget - 1), the
                                    # rest by confidence (or the bound); 0 = the whole budget by score (paper)
    tau: float = 1.0                # sharpening temperature of the soft reveal, w ~ p ** (1 / tau)
    gamma: float = 0.0              # exponent of the confidence gate c ** gamma (0 = no gate)
    lam: float = 1.0                # weight of the anti-collapse penalty (0 = none)
    h_max: float = 0.5              # the penalty's entropy floor at the first step (nats); decays linearly
    rho: float = 1.0                # surrogate: probes capped to the ceil(rho * L) of highest entropy
    use_tis: bool = True            # ablation: False scores by gate and penalty alone
    sparse_backward: bool = True    # the backward through the active rows only, O(|A| L d); False: the
                                    # exact one, for a logits_fn without an `active` keyword

# The paper's configuration: the gradient at the surrogate state, the 8 most confident positions as
# candidates at their soft embeddings, the whole budget ranked by score, the backward through the active rows.
PAPER_BOE = SamplerConfig(linearize="surrogate", reveal="soft", estimator="tangent", candidates=8, influential=0)


@dataclass
class Step:
    """What an order rule sees at one decoding step."""
    model: nn.Module         # the MDM, for rules that run more passes
    tokens: torch.Tensor     # [B, L] current state x_t
    masked: torch.Tensor     # [B, L] bool, still [MASK]
    probs: torch.Tensor      # [B, L, V] predictive distribution, p([MASK]) = 0
    budget: torch.Tensor     # [B] reveals this step (for adaptive rules: the least they may make)
    progress: float          # steps left / steps: 1 at the first step, 1 / T at the last
    cfg: SamplerConfig       # the rules' knobs
    generators: list         # one torch.Generator per row
    forwards: torch.Tensor   # [B] forward passes so far, updated by rules that run more


def predict(model, tokens):
    """Logits and probabilities with [MASK] excluded: the model never proposes [MASK]."""
    logits = model(tokens)  # [B, L, V]
    check_model_output(logits, (*tokens.shape, model.cfg.vocab_size))
    logits = logits.float()  # [B, L, V]
    logits[..., model.mask_id] = -math.inf
    check_logits(logits, "the model")
    return logits, logits.softmax(-1)  # [B, L, V], [B, L, V]


def entropy(probs):
    return torch.special.entr(probs).sum(-1)  # [...], nats; entr(0) = 0


def top_masked(values, masked, count):
    """Per row, the `count[b]` masked positions with the largest values: positions [B, K] and a
    validity mask [B, K] (rows with fewer masked positions get fewer valid entries)."""
    k = min(int(count.max()), values.shape[1]) if len(count) else 0
    lowest = torch.finfo(values.dtype).min  # a masked position ranks above every other, -inf or NaN included
    values = values.nan_to_num(nan=lowest, posinf=math.inf, neginf=lowest).masked_fill(~masked, -math.inf)  # [B, L]
    ranked = values.argsort(dim=1, descending=True, stable=True)  # [B, L]
    positions = ranked[:, :k]  # [B, K] ties go to the left
    valid = torch.arange(k, device=values.device) < torch.minimum(count, masked.sum(1))[:, None]  # [B, K]
    return positions, valid


def entropy_bound_count(own_entropy, masked, bound):
    """The EB-sampler's step size [B]: the longest run of masked positions, in ascending entropy, whose
    entropies all but the largest sum to at most `bound`; at least 1 where a position is masked (and the
    entropies are not NaN)."""
    ascending = own_entropy.masked_fill(~masked, math.inf).sort(1).values  # [B, L]
    finite = ascending.isfinite()  # [B, L] the masked ones, first
    before = F.pad(ascending.masked_fill(~finite, 0.0).cumsum(1)[:, :-1], (1, 0))  # [B, L] sum of the smaller
    return ((before <= bound) & finite).sum(1)  # [B]


def score_random(s):
    scores = torch.stack([torch.rand(s.tokens.shape[1], generator=g) for g in s.generators])  # [B, L]
    return scores.to(s.tokens.device)


def score_left_to_right(s):
    positions = torch.arange(s.tokens.shape[1], dtype=torch.float32, device=s.tokens.device)  # [L]
    return -positions.expand(s.tokens.shape)  # [B, L]


def score_confidence(s):
    return s.probs.max(-1).values  # [B, L]


def score_margin(s):
    top2 = s.probs.topk(2, dim=-1).values  # [B, L, 2]
    return top2[..., 0] - top2[..., 1]  # [B, L]


def score_entropy(s):
    return -entropy(s.probs)  # [B, L]


def score_entropy_bound(s):  # adaptive: (scores, how many)
    own_entropy = entropy(s.probs)  # [B, L]
    return -own_entropy, entropy_bound_count(own_entropy, s.masked, s.cfg.entropy_bound)


def score_threshold(s):  # adaptive: (scores, how many); the loop's floor of 1 is the "most confident one"
    confidence = s.probs.max(-1).values  # [B, L]
    return confidence, ((confidence >= s.cfg.confidence_threshold) & s.masked).sum(1)


# Order rules that score from the step's forward; "boe" and "boe-adaptive" run it themselves (section 4).
ORDER_RULES = {
    "random": score_random,
    "left-to-right": score_left_to_right,
    "confidence": score_confidence,
    "margin": score_margin,
    "entropy": score_entropy,
    "entropy-bound": score_entropy_bound,
    "threshold": score_threshold,
}
ORDERS = (*ORDER_RULES, "boe", "boe-adaptive")


@torch.no_grad()
def generate(model, prompts, steps, order="boe", cfg=SamplerConfig(), seed=0):
    """Fill every [MASK] of `prompts` [B, L] in at most `steps` steps, choosing positions by `order`: a
    name in ORDERS, or a function of a Step that returns scores [B, L] (or scores and how many to reveal,
    [B], as the adaptive rules do).

    Returns (tokens [B, L], record). Row b draws its random numbers (random order, sampling) from a
    generator seeded with seed + b, so row b gives the same output in a batch as alone with seed + b. record:
      reveal_step [B, L]  step at which each position was revealed (-1: given in the prompt)
      forwards    [B]     forward passes spent on each row (a row with nothing masked costs none)
      backwards   [B]     backward passes spent on each row
      wall_s              seconds for the whole batch
    """
    check_generate_args(model, prompts, steps, order, ORDERS, seed)
    check_sampler_config(cfg)
    steps, seed = operator.index(steps), operator.index(seed)
    start = time.time()
    B, L = prompts.shape
    device = prompts.device
    tokens = prompts.clone()  # [B, L]
    generators = [torch.Generator().manual_seed(seed + b) for b in range(B)]
    forwards = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    backwards = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    reveal_step = torch.full((B, L), -1, device=device)  # [B, L]
    for t in range(steps):
        masked = tokens == model.mask_id  # [B, L]
        n_masked = masked.sum(1)  # [B]
        if not n_masked.any():
            break
        steps_left = steps - t
        spread = min(steps_left, L)  # as good as steps_left (masked <= L), and no int64 overflow for a huge `steps`
        budget = (n_masked + spread - 1) // spread  # [B] ceil(masked / steps_left)
        forwards += n_masked > 0
        if order in ("boe", "boe-adaptive"):  # the step's forward and BoE's scores from one call (section 4)
            logits, scores, budget, charged = boe_step(tokens, masked, budget, model.token_embedding.weight,
                                                       model.forward_embeds, model.mask_id, cfg, steps_left / steps,
                                                       adaptive=order == "boe-adaptive")
            forwards += charged & (cfg.linearize == "surrogate")  # the surrogate's second forward
            backwards += charged
        else:
            logits, probs = predict(model, tokens)  # [B, L, V]
            rule = order if callable(order) else ORDER_RULES[order]
            scores = rule(Step(model, tokens, masked, probs, budget, steps_left / steps, cfg, generators,
                                forwards))  # [B, L]
            check_rule_output(scores, masked.shape)
            if isinstance(scores, tuple):  # an adaptive rule: how many, at least the schedule's floor
                scores, wanted = scores  # [B, L], [B]
                budget = torch.maximum(budget, wanted.to(budget))  # [B]
        positions, valid = top_masked(scores.float(), masked, budget)  # [B, K] the budget's best masked positions
        reveal = torch.zeros_like(masked).scatter(1, positions, valid)  # [B, L]
        tokens = torch.where(reveal, commit(logits, cfg.temperature, generators), tokens)  # [B, L]
        reveal_step[reveal] = t
    record = dict(reveal_step=reveal_step, forwards=forwards, backwards=backwards, wall_s=time.time() - start)
    return tokens, record


def commit(logits, temperature, generators):
    """The token each position would take if revealed now: argmax, or a sample at a temperature.
    `logits` has the [MASK] column at -inf, so [MASK] is never committed."""
    if temperature == 0:
        return logits.argmax(-1)  # [B, L]
    shifted = logits - logits.amax(-1, keepdim=True)  # [B, L, V] <= 0: a tiny temperature cannot overflow it
    sharpened = (shifted / temperature).softmax(-1).cpu()  # [B, L, V]
    return torch.stack([torch.multinomial(row, 1, generator=g)[:, 0]
                        for row, g in zip(sharpened, generators)]).to(logits.device)  # [B, L]


# -----------------------------------------------------------------------------
# 4. Backward-on-Entropy: the Token Influence Score
#
# The cost to lower is the uncertainty still to resolve along the trajectory, J(x_t) = sum_{s < t} H(x_s),
# with H(x) = sum_{j masked} H(p_theta(. | x)_j). Its one-step lookahead is H(x_{t-1}), the masked entropy
# right after this step's reveals; measured exactly it costs one forward per candidate
# (experiments.lookahead, the yardstick of the README's tables). BoE treats a reveal as a move of one
# input embedding and expands to first order:
#
#   reveal i:     e_i = E[MASK]  ->  E[MASK] + delta_i
#   cost:         H(e) = sum_{j in P} H(p_j(. | e)),   P = the probes (masked positions)
#   first order:  H(.. e_i + delta_i ..) - H(e*)  ~  <g_i, delta_i>,   g = dH/de at a point e*
#   TIS_i = -<g_i, delta_i>                       (higher = a larger predicted drop of the entropy left)
#
# g is the gradient of one scalar, so one backward gives the TIS of every position at once. Where to take
# it (e*) and which way a reveal points (delta):
#   linearize="surrogate"  (the paper) every candidate at its soft embedding e~_i = sum_v w_i(v) E[v],
#       w_i ~ p_i ** (1 / tau) (with reveal="soft"), the other masked positions as probes: a second forward
#       and one backward, where some masked position is not a candidate.
#   linearize="state"  [ours] e* = embed(x_t), every masked position a probe: TIS_i expands the drop of
#       revealing i alone, what the exact lookahead measures; e* is the input of the step's own forward,
#       run with gradient tracking, so one backward follows and no second forward.
#   reveal="soft"  delta_i = e~_i - E[MASK] (the paper); "onehot" E[argmax p_i] - E[MASK], the argmax commit [ours].
# From g to a score: the paper's tangent, or |g_i| weighed by what the committed token tells
# (influence_scores); then the paper's confidence gate (its form c ** gamma ours, off by default: gamma = 0)
# and anti-collapse penalty (boe_scores).
#
# The set rule [ours]: a step commits its reveals together, each from its marginal, and the tokens that
# most lower the others' entropy are the most tied to each other, so two revealed together can disagree.
# BoE picks one reveal by score; the rest of the step goes to the most confident positions (fixed
# schedule: nearly determined, so safe alongside) or to the entropy bound (adaptive). Adaptive, BoE picks
# only where the bound is stuck, admitting one token because nothing is near-certain, as a constraint
# solver branches only when propagation stalls: near-certain reveals cost at most gamma and may settle
# the uncertain tokens where the uncertainty is the model's own; an earlier pick would be a guess that
# waiting avoids. A stuck step reveals one uncertain token anyway (alone, it makes no dependence error),
# and the one that most lowers the entropy left should let later steps reveal the most: fewer forwards
# are all a pick can buy. So the backward runs only where the step's forward says a pick can change the
# step and, adaptive, pay for itself (boe_influence). With sparse_backward only the active rows (probes and
# candidates) pass gradient (the paper's ActiveQueryAttention): exact in the last layer, approximate below.

def probe_entropy_gradient(logits, embeds, probes, mask_id=None):
    """g = dH/d embeds [B, L, D] (float32 or wider), H = the summed entropy at the probes (bool [B, L]),
    for `logits` [B, L, V] computed from `embeds` with gradient tracking; the [MASK] column is removed
    before the softmax (an MDM never predicts [MASK]). Rows are independent."""
    if torch.is_inference_mode_enabled():  # torch.no_grad() can be left (below); inference mode cannot
        raise RuntimeError("BoE differentiates the model: call it under torch.no_grad(), not torch.inference_mode(), "
                           "whose tensors can join no autograd graph")
    if not logits.requires_grad:
        raise ValueError("the logits carry no graph back to the input embeddings: logits_fn must compute them "
                         "from its argument with gradient tracking (no torch.no_grad() or .detach() inside)")
    with torch.enable_grad():  # also inside a sampler's no_grad
        rows = logits[probes]  # [N, V] the probes' rows only: a long prompt costs no [L, V] float32 copies
        if mask_id is not None:
            rows = rows[:, torch.arange(rows.shape[-1], device=rows.device) != mask_id]  # [N, V-1]
        precision = torch.promote_types(rows.dtype, torch.float32)  # at least fp32 for the entropy
        # A token at -inf (one the model never predicts, log-probabilities of 0) adds p log p = 0 to H and
        # nothing to g; the clamp keeps 0 * -inf = NaN out of both.
        logp = rows.to(precision).log_softmax(-1).clamp_min(torch.finfo(precision).min)  # [N, V']
        (grad,) = torch.autograd.grad(-(logp.exp() * logp).sum(), embeds, allow_unused=True)  # [B, L, D]
    if grad is None:
        raise ValueError("the logits do not depend on the input embeddings: logits_fn must feed its argument to the "
                         "model (for a Hugging Face model, as inputs_embeds)")
    return grad.to(precision)


def entropy_gradient(logits_fn, embeds, probes, mask_id=None, active=None):
    """One forward and one backward: the logits at `embeds` [B, L, D] (detached) and g = dH/d embeds;
    `active` (bool [B, L]), where given, goes to logits_fn for the sparse backward (call_logits_fn)."""
    with torch.enable_grad():
        embeds = embeds.detach().requires_grad_(True)  # [B, L, D]
        logits = call_logits_fn(logits_fn, embeds, active)  # [B, L, V]
        return logits.detach(), probe_entropy_gradient(logits, embeds, probes, mask_id)


def influence_scores(grad, delta, probs, candidates, cfg):
    """Each candidate's predicted influence [B, L] (0 elsewhere) from g = dH/de [B, L, D], the reveal's
    delta [B, L, D] and the step's predictions p [B, L, V]:
      "tangent"         TIS_i = -<g_i, delta_i>, the first-order drop of the entropy left (the paper)
      "norm"            |g_i| [ours]: a reveal moves e_i far along a curved path, where the tangent's sign is
                        often wrong; on average conditioning cannot raise entropy, so the size is kept
      "norm-surprisal"  |g_i| E_v[-log p_i(v)], v the committed token [ours]: -log c_i at the argmax, H_i when
                        sampling at temperature 1. At E[MASK] the gradient cannot tell a near-certain token
                        from an open choice; what a committed v tells the rest is its surprisal (exactly so
                        where x_i is a function of a uniform rest, as a mark given the pivot)
      "norm-entropy"    |g_i| H_i [ours], whatever the commit rule: a reveal tells the rest I(x_i; rest) <= H_i"""
    if cfg.estimator == "tangent":
        return -(grad * delta.to(grad.dtype)).sum(-1) * candidates  # [B, L]
    size = grad.norm(dim=-1) * candidates  # [B, L]
    if cfg.estimator == "norm-surprisal" and cfg.temperature == 0:
        return size * -probs.amax(-1).log()  # [B, L]; c_i >= 1 / V, so the log is finite
    if cfg.estimator == "norm-surprisal":  # v ~ p ** (1 / temperature), as commit() draws it
        log_probs = probs.log()  # [B, L, V]
        committed = ((log_probs - log_probs.amax(-1, keepdim=True)) / cfg.temperature).softmax(-1)  # [B, L, V]
        return size * -torch.special.xlogy(committed, probs).sum(-1)  # [B, L]; 0 log 0 = 0 at [MASK]
    return size * entropy(probs) if cfg.estimator == "norm-entropy" else size  # [B, L]


def boe_step(tokens, masked, budget, embedding, logits_fn, mask_id, cfg, progress=1.0, revealable=None,
             adaptive=False):
    """One BoE decoding step on any masked diffusion model: it runs the step's forward itself (with
    gradient tracking where a backward may follow) and scores the positions to reveal.

    tokens     : [B, L] the current state x_t
    masked     : bool [B, L] positions still [MASK]: their entropy is the cost
    budget     : [B] reveals this step; with adaptive=True the least the step reveals
    embedding  : [V, D] the input embedding table (a Hugging Face model's get_input_embeddings().weight)
    logits_fn  : embeds [B, L, D] -> logits [B, L, V]; with cfg.sparse_backward also logits_fn(e, active=rows)
    mask_id    : id of [MASK]
    cfg        : SamplerConfig, BoE's knobs
    progress   : steps left / steps: 1 at the first step, 1 / T at the last; scales the penalty floor
    revealable : bool [B, L] positions that may be revealed now (the current block of a block-wise
                 decoder); default every masked position
    adaptive   : False: the fixed schedule's set rule; True: the entropy bound decides how many [ours]
    returns    : logits [B, L, V] at x_t, float32 with [MASK] at -inf: the prediction to commit from;
                 scores [B, L]: reveal the `budget` best, -inf where a position may not be revealed;
                 budget [B]: the reveals to make (the input, raised by the entropy bound when adaptive);
                 charged, bool [B]: rows whose BoE passes ran (a backward; at the surrogate also a forward)
    The set rule and when the backward runs: section 4's header. To paste it elsewhere, take section 4
    with `entropy`, `top_masked`, `entropy_bound_count`, SamplerConfig and input_checks.py."""
    check_sampler_config(cfg)
    check_boe_step_args(tokens, masked, budget, embedding, mask_id, progress, revealable, adaptive)
    logits, budget, candidates, picks, influence, charged = boe_influence(
        tokens, masked, budget, embedding, logits_fn, mask_id, cfg, revealable, adaptive)
    probs = logits.softmax(-1)  # [B, L, V]
    confidence, own_entropy = probs.max(-1).values, entropy(probs)  # [B, L], [B, L]
    scores = boe_scores(influence, candidates, confidence, own_entropy, progress, cfg)  # [B, L]
    positions, valid = top_masked(scores, candidates, picks)  # [B, K] the picks
    chosen = torch.zeros_like(candidates).scatter(1, positions, valid)  # [B, L]
    rest = -own_entropy if adaptive else confidence  # [B, L] the entropy bound's order, or confidence
    revealable = masked if revealable is None else masked & revealable  # [B, L]
    return logits, torch.where(chosen, math.inf, rest).masked_fill(~revealable, -math.inf), budget, charged


def boe_influence(tokens, masked, budget, embedding, logits_fn, mask_id, cfg, revealable=None, adaptive=False):
    """The passes of boe_step: logits (as boe_step returns them), budget [B], candidates (bool [B, L]),
    picks per row [B], influence ([B, L], 0 off the candidates) and charged rows (bool [B])."""
    revealable = masked if revealable is None else masked & revealable  # [B, L]
    n_open = revealable.sum(1)  # [B]

    # Adaptive, a pick saves forwards only: the other n - 1 masked positions take at least one more forward
    # after it and at most n - 1 without it, so it saves n - 2 at most. Where that is no more than the price
    # of its backward, the bound's own free token goes and no backward runs [ours].
    pays = (masked.sum(1) - 2 > cfg.backward_cost) | (not adaptive)  # [B]

    def pick_counts(budget):  # [B] reveals chosen by score; none where the budget takes every position
        # Fixed schedule, with `influential` reveals by score: a one-token step goes by confidence, since lowering
        # the entropy left pays only because later steps commit several at once; adaptive, BoE picks the free token.
        limit = budget if adaptive else budget - 1
        count = budget if cfg.influential == 0 else limit.clamp(0, cfg.influential)  # [B]
        return count * (budget < n_open) * pays

    # [B] as far as is known before the forward (when adaptive, a row with something to reveal reveals one)
    picks = pick_counts(budget.clamp_min(1) if adaptive else budget)
    # The step's forward, with a graph where a backward may follow. It gets the active rows wherever the
    # configuration's backward runs through them, whether or not a row picks now: the sparse path (the Triton
    # forward) and plain attention round differently, and a row's logits must not depend on other rows' picks.
    at_state = cfg.linearize == "state" and cfg.use_tis
    track = at_state and bool(picks.any())
    embeds = embedding.detach()[tokens].requires_grad_(track)  # [B, L, D]
    with torch.set_grad_enabled(track):
        raw_logits = call_logits_fn(logits_fn, embeds, masked if at_state and cfg.sparse_backward else None,
                                    len(embedding))
    # A copy, also of float32 logits: a model's last op may keep its output for the backward (log_softmax does)
    logits = raw_logits.detach().to(torch.float32, copy=True)  # [B, L, V]
    logits[..., mask_id] = -math.inf  # the model never proposes [MASK]
    check_logits(logits, "logits_fn")
    probs = logits.softmax(-1)  # [B, L, V]
    own_entropy = entropy(probs)  # [B, L]
    # Where the entropy bound would reveal every revealable position, all of them but the most uncertain
    # are near-certain: revealing any one lowers the others' entropy by their mutual information with it,
    # at most gamma. Nothing is left to steer, and the rest of the step's order decides.
    bounded = entropy_bound_count(own_entropy, revealable, cfg.entropy_bound)  # [B]
    if not adaptive:
        picks = picks * (bounded < n_open)  # [B]
    else:  # the entropy bound decides how many; BoE picks only where it admits a single token
        budget = torch.maximum(budget, bounded.to(budget.dtype))  # [B]
        picks = pick_counts(budget) * ((bounded <= 1) | (cfg.adaptive_pick == "always"))  # [B]
        # BoE picks the free token: the bound reveals its other budget - picks positions (the lowest in
        # entropy) anyway, so they are no candidates; a pick among them would leave the free token to the bound.
        settled, settled_valid = top_masked(-own_entropy, revealable, (budget - picks) * (picks > 0))  # [B, K]
        revealable = revealable & ~torch.zeros_like(masked).scatter(1, settled, settled_valid)  # [B, L]
    if cfg.candidates == 0:  # every revealable position is a candidate [ours]
        candidates = revealable  # [B, L]
    else:  # the paper's prefilter: the r most confident, at least the budget, so every reveal has a score
        count = budget.clamp_min(cfg.candidates)  # [B]
        positions, valid = top_masked(probs.max(-1).values, revealable, count)  # [B, K]
        candidates = torch.zeros_like(masked).scatter(1, positions, valid)  # [B, L]
    influence = torch.zeros(tokens.shape, device=tokens.device)  # [B, L]
    # [B] rows whose picks need TIS: with no more candidates than picks (the paper's whole budget by score, with
    # r <= budget) every candidate is picked whatever its score
    charged = (picks > 0) & (candidates.sum(1) > picks) & cfg.use_tis
    if not charged.any():  # nothing TIS would decide: the graph, if any, is dropped unused
        return logits, budget, candidates, picks, influence, charged
    reveal_embeds = reveal_embeddings(logits, embedding, cfg)  # [B, L, D]
    delta = (reveal_embeds - embedding.detach()[mask_id].to(reveal_embeds.dtype)) * candidates[..., None]  # [B, L, D]
    if cfg.linearize == "state":  # one backward through the step's own forward
        grad = probe_entropy_gradient(raw_logits, embeds, masked & charged[:, None], mask_id)  # [B, L, D]
        return logits, budget, candidates, picks, influence_scores(grad, delta, probs, candidates, cfg), charged
    probes = surrogate_probes(logits, masked, candidates, cfg)  # [B, L]
    charged &= probes.any(1)  # [B] a row without probes has nothing to differentiate
    if charged.any():
        surrogate = torch.where(candidates[..., None], reveal_embeds.to(embeds.dtype), embeds)  # [B, L, D]
        active = (candidates | probes) if cfg.sparse_backward else None  # [B, L]
        _, grad = entropy_gradient(logits_fn, surrogate, probes & charged[:, None], mask_id, active)  # [B, L, D]
        influence = influence_scores(grad, delta, probs, candidates, cfg)  # [B, L]
    return logits, budget, candidates, picks, influence, charged


def reveal_embeddings(logits, embedding, cfg):
    """Where a reveal moves each position's input embedding: [B, L, D], float32 or wider (cfg.reveal)."""
    table = embedding.detach()  # [V, D]
    table = table.to(torch.promote_types(table.dtype, torch.float32))  # [V, D]
    if cfg.reveal == "soft":  # e~ = sum_v w(v) E[v]; softmax(logits / tau) is p ** (1 / tau) renormalised
        shifted = logits - logits.amax(-1, keepdim=True)  # [B, L, V] <= 0: a tiny tau cannot overflow it
        return (shifted / cfg.tau).softmax(-1).to(table.dtype) @ table  # [B, L, D]
    return table[logits.argmax(-1)]  # [B, L, D] E[argmax p]


def surrogate_probes(logits, masked, candidates, cfg):
    """The surrogate's probes: masked positions that are not candidates (the surrogate reveals those),
    capped to the ceil(rho * L) of highest entropy, the paper's active-fraction knob."""
    probes = masked & ~candidates  # [B, L]
    n_probes = math.ceil(cfg.rho * masked.shape[1])
    if n_probes < masked.shape[1]:
        own_entropy = entropy(logits.softmax(-1))  # [B, L]
        count = torch.full((len(masked),), n_probes, device=masked.device)  # [B]
        keep, keep_valid = top_masked(own_entropy, probes, count)  # [B, P]
        probes = torch.zeros_like(probes).scatter(1, keep, keep_valid)  # [B, L]
    return probes


def boe_scores(influence, candidates, confidence, own_entropy, progress, cfg):
    """BoE's score on the candidates [B, L]: s_i = gate(c_i) * normalise(TIS_i) - lambda * [h_t - H_i]_+^2,
    with `influence` as TIS. gate = c ** gamma keeps low-confidence tokens from being revealed on TIS
    alone [ours]; TIS is min-max normalised over each row's candidates [ours]. The penalty is the paper's
    anti-collapse regulariser: its floor h_t = h_max * t / T (t = steps left, so progress = t / T) decays
    linearly, so early steps avoid spending reveals on tokens that are already nearly certain. Without TIS
    (the ablation) gate and penalty alone rank; a row without probes has TIS 0 and its penalty ranks."""
    if cfg.use_tis:
        low = influence.masked_fill(~candidates, math.inf).min(1, keepdim=True).values  # [B, 1]
        high = influence.masked_fill(~candidates, -math.inf).max(1, keepdim=True).values  # [B, 1]
        normalised = (influence - low) / (high - low).clamp_min(1e-12)  # [B, L] in [0, 1]
    else:
        normalised = torch.ones_like(influence)  # [B, L]
    penalty = cfg.lam * (cfg.h_max * progress - own_entropy).clamp_min(0) ** 2  # [B, L]
    return confidence ** cfg.gamma * normalised - penalty  # [B, L]


def check_sampler_config(cfg):
    """Every knob's type and range (the other input checks: input_checks.py)."""
    if not isinstance(cfg, SamplerConfig):
        raise TypeError(f"cfg must be a SamplerConfig; got {type(cfg).__name__}")
    for field in fields(cfg):  # each knob's type first, so that the checks below compare numbers
        value, kind = getattr(cfg, field.name), {float: numbers.Real, int: numbers.Integral}.get(field.type, field.type)
        if not isinstance(value, kind) or (field.type is not bool and isinstance(value, bool)):
            raise TypeError(f"{field.name} must be of type {field.type.__name__}; got {value!r}")
    for name, options in (("linearize", ("state", "surrogate")), ("reveal", ("onehot", "soft")),
                          ("estimator", ("tangent", "norm", "norm-surprisal", "norm-entropy")),
                          ("adaptive_pick", ("stuck", "always"))):
        if getattr(cfg, name) not in options:
            raise ValueError(f"{name} must be one of {options}; got {getattr(cfg, name)!r}")
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max  # the samplers compute in float32
    for name, ok, rule in (
            ("entropy_bound", cfg.entropy_bound >= 0 and (cfg.entropy_bound <= big or cfg.entropy_bound == math.inf),
             ">= 0 (nats), at most float32's largest or infinite"),
            ("confidence_threshold", 0 < cfg.confidence_threshold <= 1, "in (0, 1]"),
            ("candidates", 0 <= cfg.candidates < 2**31, "in [0, 2**31) (0 = every masked position)"),
            ("influential", 0 <= cfg.influential < 2**31, "in [0, 2**31) (0 = the whole budget by score)"),
            ("rho", 0 < cfg.rho <= 1, "in (0, 1]"),
            ("tau", tiny <= cfg.tau <= big, f"> 0 and finite in float32 (from {tiny:.3g} to {big:.3g})"),
            *((name, 0 <= getattr(cfg, name) <= big, f">= 0 and finite in float32 (at most {big:.3g})")
              for name in ("temperature", "gamma", "lam", "h_max", "backward_cost"))):
        if not ok:  # NaN fails every comparison, so it lands here too
            raise ValueError(f"{name} must be {rule}; got {getattr(cfg, name)!r}")
    if 0 < cfg.temperature < tiny:  # float32 would round it to 0 and divide by it
        raise ValueError(f"temperature must be 0 (the argmax) or at least {tiny:.3g}, float32's smallest normal "
                         f"number; got {cfg.temperature!r}")
    if cfg.linearize == "surrogate" and cfg.candidates == 0:
        raise ValueError("at the surrogate the probes are the masked positions that are not candidates; with "
                         "candidates=0 (every masked position) there are none and BoE never runs: set candidates "
                         ">= 1 (the paper: 8)")
    if cfg.rho < 1 and cfg.linearize != "surrogate":
        raise ValueError(f"rho < 1 caps the surrogate's probes; at the state every masked position is a "
                         f"probe (linearize='surrogate' to use it); got rho={cfg.rho}")


# -----------------------------------------------------------------------------
# 5. Main: every rule on the built-in task, accuracy against compute


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000, help="evaluation instances per row")
    parser.add_argument("--eval-seed", type=int, default=1, help="seed of the evaluation instances "
                        "(every knob was chosen on seed 0)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 3, 5, 9], help="budgets of the fixed schedule")
    parser.add_argument("--paper", action="store_true", help="BoE in the paper's configuration (PAPER_BOE)")
    parser.add_argument("--temperature", type=float, default=0.0, help="every rule commits a sample from "
                        "p ** (1 / T); 0 = the argmax (the README's tables)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--train-steps", type=int, default=TrainConfig.steps, help="training steps (a weights "
                        "file made with other settings is retrained)")
    parser.add_argument("--train-seed", type=int, default=TrainConfig.seed, help="seed of the weights and the "
                        "training data; 0 to 4 are shipped (the suite's three models, and two held out of tuning)")
    parser.add_argument("--cache", help="trained weights file (default: weights/marks-seedN.pt, N = --train-seed; "
                        "weights/marks-seedN-stepsS.pt for other --train-steps S)")
    parser.add_argument("--retrain", action="store_true", help="train even if the weights file is valid")
    args = parser.parse_args()
    if "" in (args.json, args.cache):
        parser.error("--json and --cache need a path")
    if args.instances < 1 or min(args.steps) < 1 or args.train_steps < 1:
        parser.error("--instances, --steps and --train-steps must be >= 1")
    if args.instances > 10**4:  # every rule decodes them as one batch
        parser.error(f"--instances must be at most 10**4 (the tables use 1000); got {args.instances}")
    # train() draws its data from the seeds -(seed * 10**6 + step): apart from the instances' seeds (>= 0), and
    # within a generator seed's range (int64) below 10**12
    if not 0 <= args.train_seed < 10**12:
        parser.error(f"--train-seed must be in [0, 10**12); got {args.train_seed}")
    if not 0 <= args.eval_seed < 2**63:
        parser.error(f"--eval-seed must be in [0, 2**63) (negative seeds are the training data's); got "
                     f"{args.eval_seed}")
    # Other training steps get a file of their own, so that an experiment never overwrites the shipped weights
    steps_tag = "" if args.train_steps == TrainConfig.steps else f"-steps{args.train_steps}"
    cache = args.cache or os.path.join(os.path.dirname(TrainConfig.cache), f"marks-seed{args.train_seed}{steps_tag}.pt")
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    if not 0 <= args.temperature <= big or 0 < args.temperature < tiny:
        parser.error(f"--temperature must be 0 or from {tiny:.3g} to {big:.3g}; got {args.temperature}")

    import experiments  # the weights cache and the table are measurement; experiments imports this file
    try:  # a --json or --cache that cannot be written is an error now, not after the run
        if args.json:
            experiments.check_writable(args.json)
        train_cfg = TrainConfig(steps=args.train_steps, seed=args.train_seed, cache=cache)
        model = experiments.load_or_train(ModelConfig(), train_cfg, retrain=args.retrain)
    except OSError as err:
        parser.error(str(err))
    prompts, _ = make_instances(args.instances, args.eval_seed)
    experiments.builtin_table(model, prompts, args.steps, args.paper, args.json, args.temperature)


if __name__ == "__main__":
    main()
