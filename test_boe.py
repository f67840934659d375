"""Tests for boe.py: the entropy gradient against finite differences, the sparse adjoint against its
dense reference, the fused BoE step against separate passes, the charged passes against the passes
that run, sampler invariants for every order rule and BoE configuration, BoE inside a model written
the way Hugging Face models are, and clear errors on bad input."""
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import subprocess
import sys
import threading
import types

import pytest
import torch
import torch.nn.functional as F

import attn_kernel
import boe
import experiments
import input_checks
from conftest import needs_triton, run_without_triton

# The model's attention runs the pure-PyTorch ActiveQueryAttention here; the Triton path (interpreted
# on a CPU) is compared with it in test_kernel.py and in test_tis_same_with_triton_and_torch_backends.
boe.ATTENTION_BACKEND = "torch"

SMALL = boe.ModelConfig(n_layer=2, n_head=2, d_model=32)  # head size 16, the smallest the kernel takes
ADAPTIVE_ORDERS = ("entropy-bound", "threshold", "boe-adaptive")  # rules that also decide how many


def random_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return boe.MaskedDiffusionTransformer(SMALL).to(dtype).eval()


def random_tis_inputs(model, seed, batch=3):
    """Embeddings of partly masked task prompts, random deltas, random probes."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = boe.make_instances(batch, seed)
    keep = torch.rand(prompts.shape, generator=gen) < 0.4  # [B, L]
    tokens = torch.where(keep, answers, prompts)  # [B, L]
    dtype = model.head.weight.dtype
    embeds = model.embed(tokens).detach() + 0.1 * torch.randn(*tokens.shape, SMALL.d_model, generator=gen).to(dtype)
    delta = torch.randn(embeds.shape, generator=gen).to(dtype)  # [B, L, D]
    probes = torch.rand(tokens.shape, generator=gen) < 0.5  # [B, L]
    return embeds, delta, probes


def probe_entropy(model, embeds, probes):
    logits = model.forward_embeds(embeds)[..., : boe.MASK]  # [B, L, V - 1], [MASK] is the last id
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)[probes].sum()


# -----------------------------------------------------------------------------
# Model and training


def test_block_is_pre_norm_attention_then_pre_norm_mlp():
    # Block's docstring, written out with its own parameters: x + attn(ln(x)), then x + mlp(ln(x)).
    model = random_model(torch.float64)
    block = model.blocks[0]
    x = torch.randn(2, boe.SEQ_LEN, SMALL.d_model, dtype=torch.float64)  # [B, L, D]
    B, L, D = x.shape
    qkv = block.qkv(F.layer_norm(x, (D,), block.ln_attn.weight, block.ln_attn.bias))  # [B, L, 3D]
    q, k, v = (part.view(B, L, SMALL.n_head, -1).transpose(1, 2) for part in qkv.split(D, -1))  # [B, H, L, Dh]
    heads = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1) @ v  # [B, H, L, Dh]
    mid = x + block.proj(heads.transpose(1, 2).reshape(B, L, D))  # [B, L, D]
    want = mid + block.mlp(F.layer_norm(mid, (D,), block.ln_mlp.weight, block.ln_mlp.bias))  # [B, L, D]
    with torch.no_grad():
        torch.testing.assert_close(block(x, None), want)


class UniformModel:
    """A stand-in that predicts every token with the same probability and records what it was shown."""
    mask_id = boe.MASK

    def __init__(self):
        self.seen = []

    def __call__(self, tokens):
        self.seen.append(tokens)
        return torch.zeros(*tokens.shape, boe.MASK + 1)  # [n, L, V]: NLL log V everywhere


def test_masked_diffusion_loss_masks_answers_only_and_is_unbiased_where_every_nll_is_equal():
    # The MDM objective masks each answer position with probability t and weights by 1 / t: given t, the
    # expected number masked is t times the positions to fill, so where every token's NLL is the same c the
    # loss averages to c (without the weight, to c / 2). Prompt positions are never masked.
    prompts, answers = boe.make_instances(20000, seed=5)
    model = UniformModel()
    loss = boe.masked_diffusion_loss(model, prompts, answers, torch.Generator().manual_seed(0))
    assert math.isclose(loss.item(), math.log(boe.MASK + 1), rel_tol=0.05)
    (shown,) = model.seen
    given = prompts != boe.MASK  # [n, L]
    assert torch.equal(shown[given], answers[given]) and (shown == boe.MASK).any()


def test_training_decays_the_learning_rate_by_cosine_to_a_tenth_and_restores_the_thread_count(monkeypatch):
    rates = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # train runs on one thread, then gives back what it found
    try:
        boe.train(SMALL, boe.TrainConfig(steps=8, batch_size=4, lr=1e-3, cache=""))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    want = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 8))) for step in range(1, 9)]
    assert rates == pytest.approx(want) and rates[-1] == pytest.approx(1e-4)


# -----------------------------------------------------------------------------
# Token Influence Score


def tis(model, embeds, delta, probes, active=None):
    """TIS = -<dH/de, delta> [B, L] from boe.entropy_gradient."""
    _, grad = boe.entropy_gradient(model.forward_embeds, embeds, probes, boe.MASK, active)  # [B, L, D]
    return -(grad * delta).sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tis_matches_central_finite_differences_in_float64(seed):
    model = random_model(torch.float64, seed)
    embeds, delta, probes = random_tis_inputs(model, seed)
    estimate = tis(model, embeds, delta, probes)  # [B, L]
    eps = 1e-5  # central differences: truncation ~eps^2, rounding ~1e-16 / eps
    B, L, _ = embeds.shape
    fd = torch.zeros(B, L, dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            for i in range(L):
                step = torch.zeros_like(embeds)
                step[b, i] = eps * delta[b, i]
                fd[b, i] = -(probe_entropy(model, embeds + step, probes)
                             - probe_entropy(model, embeds - step, probes)) / (2 * eps)
    assert torch.allclose(estimate, fd, rtol=1e-6, atol=1e-8 * fd.abs().max())


def test_tis_at_the_state_matches_finite_differences_of_real_reveals_directions():
    # At the state every masked position sits at E[MASK] and the direction is E[argmax] - E[MASK]:
    # the tangent boe_step uses, against central differences along that direction; and the paper's TIS
    # as a step computes it (boe_influence, estimator="tangent"), the same first-order drop.
    model = random_model(torch.float64, 3)
    prompts = partly_masked_prompts(3, seed=4)
    masked = prompts == boe.MASK  # [B, L]
    embeds = model.embed(prompts).detach()  # [B, L, D]
    logits, grad = boe.entropy_gradient(model.forward_embeds, embeds, masked, boe.MASK)
    table = model.token_embedding.weight.detach()  # [V, D]
    delta = (table[logits[..., : boe.MASK].argmax(-1)] - table[boe.MASK]) * masked[..., None]  # [B, L, D]
    cfg = boe.SamplerConfig(estimator="tangent", sparse_backward=False)
    *_, influence, charged = boe.boe_influence(prompts, masked, torch.full((len(prompts),), 2), table,
                                               model.forward_embeds, boe.MASK, cfg)  # [B, L], [B]
    assert charged.all()
    eps = 1e-5
    with torch.no_grad():
        for b, i in masked.nonzero().tolist():
            step = torch.zeros_like(embeds)
            step[b, i] = eps * delta[b, i]
            fd = -(probe_entropy(model, embeds + step, masked) - probe_entropy(model, embeds - step, masked)) / (2 * eps)
            assert math.isclose(-(grad[b, i] * delta[b, i]).sum().item(), fd.item(), rel_tol=1e-6, abs_tol=1e-9)
            assert math.isclose(influence[b, i].item(), fd.item(), rel_tol=1e-6, abs_tol=1e-9)


def test_tis_with_active_rows_equals_dense_autograd_with_inactive_rows_detached(monkeypatch):
    model = random_model(torch.float64)
    embeds, delta, probes = random_tis_inputs(model, seed=5)
    gen = torch.Generator().manual_seed(5)
    active = probes | (torch.rand(probes.shape, generator=gen) < 0.3)  # [B, L]
    sparse = tis(model, embeds, delta, probes, active)
    # The reference: every attention layer's inactive output rows detached, dense autograd.
    monkeypatch.setattr(boe, "active_query_attention",
                        lambda q, k, v, active, backend: attn_kernel.reference_attention(q, k, v, active))
    reference = tis(model, embeds, delta, probes, active)
    dense = tis(model, embeds, delta, probes)
    assert torch.allclose(sparse, reference, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(sparse, dense, rtol=1e-3), "the active set should change the gradient"


def test_entropy_gradient_is_the_same_when_called_under_no_grad():
    model = random_model(torch.float64)
    embeds, _, probes = random_tis_inputs(model, seed=4)
    logits, grad = boe.entropy_gradient(model.forward_embeds, embeds, probes, boe.MASK)
    with torch.no_grad():
        again = boe.entropy_gradient(model.forward_embeds, embeds, probes, boe.MASK)
    assert torch.equal(again[0], logits) and torch.equal(again[1], grad)


def test_forward_logits_unchanged_by_active_rows():
    # With gradient tracking, as in a BoE step, so that the active-row path really runs.
    model = random_model(torch.float64)
    embeds, _, probes = random_tis_inputs(model, seed=7)
    sparse = model.forward_embeds(embeds.requires_grad_(), active=probes)  # [B, L, V]
    assert sparse.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(sparse, model.forward_embeds(embeds))


@needs_triton
def test_tis_same_with_triton_and_torch_backends(monkeypatch):
    # On a CPU the kernels run in Triton's interpreter (conftest.py); on a GPU, compiled.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(torch.float32)
    embeds, delta, probes = random_tis_inputs(model, seed=9, batch=2)
    model, embeds, delta, probes = (x.to(device) for x in (model, embeds, delta, probes))
    active = probes.clone()
    active[:, 0] = True
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(boe, "ATTENTION_BACKEND", backend)
        results[backend] = tis(model, embeds, delta, probes, active)
    scale = results["torch"].abs().max()
    assert torch.allclose(results["triton"], results["torch"], rtol=1e-4, atol=1e-4 * scale)


@needs_triton
def test_a_rows_step_does_not_depend_on_whether_other_rows_pick(monkeypatch):
    # The Triton forward rounds otherwise than plain attention, so the step's forward must take the same path
    # for a row whether or not another row of its batch picks (and so needs the graph). One batch shape for
    # both calls: on a GPU a matmul's rounding may also change with the batch size, whatever the attention.
    monkeypatch.setattr(boe, "ATTENTION_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(torch.float32).to(device)
    prompts = partly_masked_prompts().to(device)  # [n, L]
    masked = prompts == boe.MASK  # [n, L]
    odd = torch.arange(len(prompts), device=device) % 2 == 1  # [n]
    step = functools.partial(boe.boe_step, prompts, masked, embedding=model.token_embedding.weight,
                             logits_fn=model.forward_embeds, mask_id=boe.MASK, cfg=boe.SamplerConfig())
    none_pick = step(masked.sum(1))  # every row reveals all it has
    odd_pick = step(torch.where(odd, 2, masked.sum(1)))  # [n] the odd rows reveal 2 and pick
    assert not none_pick[3].any() and odd_pick[3].any() and not odd_pick[3][~odd].any()
    for name, a, b in zip(("logits", "scores", "budget"), none_pick, odd_pick):
        assert torch.equal(a[~odd], b[~odd]), f"{name} of the even rows change when the odd rows pick"


def test_a_pick_is_always_among_the_candidates():
    # The paper's prefilter: the r most confident revealable positions are the candidates, and the picks
    # (score +inf) come from them, also where a non-candidate's score would rank above a candidate's (the
    # tangent, a signed score, min-max normalised over the candidates, puts 0 inside their range).
    model = random_model(torch.float64, 1)
    tokens = partly_masked_prompts(16, seed=8)
    masked = tokens == boe.MASK  # [B, L]
    table = model.token_embedding.weight
    budget = torch.full((len(tokens),), 2)  # [B]
    for cfg in (boe.PAPER_BOE, dataclasses.replace(boe.PAPER_BOE, linearize="state", reveal="onehot", candidates=3)):
        logits, _, candidates, picks, influence, charged = boe.boe_influence(
            tokens, masked, budget, table, model.forward_embeds, boe.MASK, cfg)
        _, scores, _, _ = boe.boe_step(tokens, masked, budget, table, model.forward_embeds, boe.MASK, cfg)
        picked = scores == math.inf  # [B, L]
        assert charged.any() and torch.equal(picked.sum(1), picks)
        assert not (picked & ~candidates).any(), f"a pick outside the candidates with {cfg}"
        probs = logits.softmax(-1)  # [B, L, V]
        confidence, own_entropy = probs.amax(-1), boe.entropy(probs)  # [B, L]
        all_scores = boe.boe_scores(influence, candidates, confidence, own_entropy, 1.0, cfg)  # [B, L]
        outranked = all_scores.masked_fill(~masked | candidates, -math.inf).amax(1) > \
            all_scores.masked_fill(~candidates, math.inf).amin(1)  # [B] a non-candidate outscores a candidate
        assert (outranked & charged).any(), "no state where the rule is put to the test"


@pytest.mark.parametrize("estimator", ["tangent", "norm", "norm-surprisal", "norm-entropy"])
@pytest.mark.parametrize("sparse", [True, False])
def test_fused_step_gives_the_logits_and_influence_of_separate_passes(estimator, sparse):
    # The state's step differentiates its own forward. Unfused: a plain forward for the logits, then a
    # separate forward + backward at embed(x_t) for the gradient; both must give the same numbers.
    model = random_model(torch.float64)
    tokens = partly_masked_prompts()
    masked = tokens == boe.MASK  # [B, L]
    budget = torch.full((len(tokens),), 2)  # [B]
    cfg = boe.SamplerConfig(estimator=estimator, sparse_backward=sparse)
    table = model.token_embedding.weight
    logits, _, candidates, _, influence, charged = boe.boe_influence(tokens, masked, budget, table,
                                                                     model.forward_embeds, boe.MASK, cfg)
    plain_logits, plain_probs = boe.predict(model, tokens)  # [B, L, V]
    assert torch.equal(logits, plain_logits)
    _, grad = boe.entropy_gradient(model.forward_embeds, model.embed(tokens), masked, boe.MASK,
                                   masked if sparse else None)  # [B, L, D]
    delta = (table[plain_logits.argmax(-1)] - table[boe.MASK]) * masked[..., None]  # [B, L, D]
    assert torch.equal(candidates, masked) and torch.equal(charged, budget < masked.sum(1))
    want = boe.influence_scores(grad, delta, plain_probs, masked, cfg) * charged[:, None]  # [B, L]
    assert not charged.all() and torch.allclose(influence, want, rtol=1e-12, atol=1e-15)  # no choice: none


@pytest.mark.parametrize("cfg", [boe.SamplerConfig(), boe.SamplerConfig(sparse_backward=False),
                                 dataclasses.replace(boe.PAPER_BOE, candidates=4)],
                         ids=["default", "dense", "paper-r4"])
def test_boe_step_takes_log_probabilities_as_logits(cfg):
    # Some models return log-probabilities (log_softmax keeps its output for the backward): the step must not
    # write into them, and scores and picks are those of the plain logits (softmax ignores a shift).
    model = random_model()
    tokens = partly_masked_prompts()
    args = (tokens, tokens == boe.MASK, torch.full((len(tokens),), 3), model.token_embedding.weight)
    plain = boe.boe_step(*args, model.forward_embeds, boe.MASK, cfg)
    log_probs = boe.boe_step(*args, lambda *a, **k: model.forward_embeds(*a, **k).log_softmax(-1), boe.MASK, cfg)
    assert plain[3].any(), "a backward ran"
    assert torch.equal(plain[1] == math.inf, log_probs[1] == math.inf), "the same picks"
    assert torch.allclose(plain[1], log_probs[1], atol=1e-5)
    assert torch.allclose(plain[0].softmax(-1), log_probs[0].softmax(-1), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("cfg", [boe.SamplerConfig(), boe.SamplerConfig(sparse_backward=False),
                                 dataclasses.replace(boe.PAPER_BOE, candidates=3, estimator="norm")],
                         ids=["default", "dense", "surrogate-r3"])
def test_boe_step_on_a_half_precision_model_agrees_with_float64_to_its_rounding(dtype, cfg, monkeypatch):
    # Real models run in float16 or bfloat16. The step reads their logits in float32 (softmax, entropy, TIS)
    # and returns float32, so it agrees with the same weights in float64 to the half model's own rounding
    # (on this model about 1e-3 of the largest score in float16, 1e-2 in bfloat16). Compared on the rows
    # where both chose the same candidates and picks (the prefilter can flip a near-tie of confidences).
    # The surrogate is compared through |g|: the paper's tangent is an inner product with much cancellation,
    # whose bfloat16 error reaches a third of the largest score here.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = partly_masked_prompts().to(device)  # [B, L]
    masked = tokens == boe.MASK  # [B, L]
    budget = torch.full((len(tokens),), 2, device=device)  # [B]
    runs = {}
    for name, model, backend in (("exact", random_model(torch.float64), "torch"),  # Triton takes no float64
                                 ("half", random_model(torch.float32).to(dtype), boe.ATTENTION_BACKEND)):
        if device == "cpu" and dtype == torch.bfloat16:
            backend = "torch"  # Triton's CPU interpreter has no bfloat16
        monkeypatch.setattr(boe, "ATTENTION_BACKEND", backend)
        model = model.to(device)
        runs[name] = boe.boe_influence(tokens, masked, budget, model.token_embedding.weight, model.forward_embeds,
                                       boe.MASK, cfg)
    (logits, _, candidates, picks, influence, charged), half = runs["exact"], runs["half"]
    assert half[0].dtype == torch.float32 and half[4].dtype == torch.float32
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    assert (half[0] - logits).nan_to_num(posinf=0, neginf=0).abs().max() < tolerance
    same = (half[2] == candidates).all(1) & (half[3] == picks) & (half[5] == charged)  # [B]
    assert (same & charged).any(), "a row to compare"
    scale = influence[same].abs().max()
    assert ((half[4] - influence)[same].abs().max() / scale) < tolerance


def test_adaptive_boe_picks_its_token_outside_the_set_the_bound_reveals_anyway():
    # With a loose bound the bound admits several positions; BoE's pick (the free token) must come from
    # the others, or the step would reveal the bound's own free token and the backward would be wasted.
    model = random_model()
    tokens = partly_masked_prompts(n=16)
    masked = tokens == boe.MASK  # [B, L]
    cfg = boe.SamplerConfig(adaptive_pick="always", entropy_bound=6.0)  # nats: 2 to 3 positions here
    logits, scores, budget, charged = boe.boe_step(tokens, masked, torch.ones(len(tokens), dtype=torch.long),
                                                   model.token_embedding.weight, model.forward_embeds, boe.MASK,
                                                   cfg, adaptive=True)
    own_entropy = boe.entropy(logits.softmax(-1))  # [B, L]
    checked = 0
    for row in range(len(tokens)):
        picked = torch.nonzero(scores[row] == math.inf).flatten().tolist()
        assert len(picked) == int(charged[row])  # one pick where the backward ran, none elsewhere
        if not picked or budget[row] < 2:
            continue
        order = own_entropy[row].masked_fill(~masked[row], math.inf).argsort(stable=True)  # [L] ascending
        assert picked[0] not in order[: int(budget[row]) - 1].tolist()
        revealed = scores[row].argsort(descending=True, stable=True)[: int(budget[row])]  # the step's reveals
        assert set(revealed.tolist()) == set(order[: int(budget[row]) - 1].tolist()) | {picked[0]}
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("knobs", [dict(), dict(gamma=0.5, lam=2.0, h_max=1.5)], ids=["default", "gate-penalty"])
def test_boe_scores_are_the_gate_times_min_max_influence_minus_the_penalty(knobs):
    # Oracle: the docstring's formula written out per candidate in Python floats, on influences of both signs.
    cfg = boe.SamplerConfig(**knobs)
    gen = torch.Generator().manual_seed(0)
    influence = torch.randn(3, 7, generator=gen, dtype=torch.float64) + 0.3  # [B, L]
    candidates = torch.rand(3, 7, generator=gen) < 0.7  # [B, L]
    candidates[:, :2] = True  # at least two candidates a row, so that max > min
    confidence = 0.1 + 0.9 * torch.rand(3, 7, generator=gen, dtype=torch.float64)  # [B, L]
    own_entropy = torch.rand(3, 7, generator=gen, dtype=torch.float64)  # [B, L]
    progress = 0.8
    got = boe.boe_scores(influence, candidates, confidence, own_entropy, progress, cfg)  # [B, L]
    for b in range(3):
        values = [influence[b, i].item() for i in range(7) if candidates[b, i]]
        low, high = min(values), max(values)
        for i in range(7):
            if candidates[b, i]:
                penalty = cfg.lam * max(cfg.h_max * progress - own_entropy[b, i].item(), 0.0) ** 2
                want = confidence[b, i].item() ** cfg.gamma * (influence[b, i].item() - low) / (high - low) - penalty
                assert math.isclose(got[b, i].item(), want, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("estimator, temperature", [("norm-surprisal", 0.0), ("norm-surprisal", 0.5),
                                                     ("norm-surprisal", 1.0), ("norm-entropy", 0.0)])
def test_norm_estimators_weigh_the_gradient_size_by_what_the_reveal_tells(estimator, temperature):
    # |g_i| times the expected surprisal -log p_i(v) of the token the sampler commits (v = argmax at
    # temperature 0, v ~ p ** (1 / temperature) otherwise), or times the entropy H_i, written out from
    # their definitions in float64 with a [MASK] column of probability 0. The argmax's surprisal never
    # exceeds the entropy, and at temperature 1 the expected surprisal is the entropy.
    gen = torch.Generator().manual_seed(0)
    grad, delta = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64), torch.randn(3, 5, 4, generator=gen)
    probs = torch.rand(3, 5, 6, generator=gen, dtype=torch.float64).softmax(-1)  # [B, L, V]
    probs = torch.cat([probs, torch.zeros(3, 5, 1, dtype=torch.float64)], -1)  # [B, L, V + 1]: [MASK] last
    candidates = torch.rand(3, 5, generator=gen) < 0.6  # [B, L]

    def expected_surprisal(p):  # one position's distribution, as a list
        if temperature == 0:
            return -math.log(max(p))
        weights = [x ** (1 / temperature) for x in p]
        return sum(w / sum(weights) * -math.log(x) for w, x in zip(weights, p) if x > 0)

    own_entropy = torch.tensor([[sum(-x * math.log(x) for x in p if x > 0) for p in row] for row in probs.tolist()],
                               dtype=torch.float64)  # [B, L]
    surprisal = torch.tensor([[expected_surprisal(p) for p in row] for row in probs.tolist()],
                             dtype=torch.float64)  # [B, L]
    if temperature == 0:
        assert (surprisal <= own_entropy + 1e-12).all()
    weight = surprisal if estimator == "norm-surprisal" else own_entropy  # [B, L]
    cfg = boe.SamplerConfig(estimator=estimator, temperature=temperature)
    got = boe.influence_scores(grad, delta, probs, candidates, cfg)  # [B, L]
    want = torch.linalg.vector_norm(grad, dim=-1) * weight * candidates  # [B, L]
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    if temperature == 1:
        assert torch.allclose(surprisal, own_entropy, rtol=1e-12)


# -----------------------------------------------------------------------------
# Samplers

ALL_ORDERS = list(boe.ORDERS)
# Every order rule with its default settings, and BoE in every configuration it offers: the paper's
# (the surrogate state; with these prompts' at most 8 masked positions and r = 8 there are never probes,
# so also with 2 candidates, with capped probes, and a dense backward), and at the state the tangent, |g| alone,
# |g| H, a soft reveal, the whole budget by score, two influential reveals, 2 candidates, the exact backward,
# and no TIS; more candidates asked for than there are positions; and a bound loose enough to leave late
# steps nothing to steer.
BOE_CONFIGS = {
    "boe-paper": boe.PAPER_BOE,
    "boe-paper-r2": dataclasses.replace(boe.PAPER_BOE, candidates=2),
    "boe-paper-r2-rho0.1": dataclasses.replace(boe.PAPER_BOE, candidates=2, rho=0.1),
    "boe-paper-r2-dense": dataclasses.replace(boe.PAPER_BOE, candidates=2, sparse_backward=False),
    "boe-tangent": boe.SamplerConfig(estimator="tangent"),
    "boe-norm": boe.SamplerConfig(estimator="norm"),
    "boe-norm-entropy": boe.SamplerConfig(estimator="norm-entropy"),
    "boe-tangent-soft": boe.SamplerConfig(estimator="tangent", reveal="soft", tau=0.5),
    "boe-whole-budget": boe.SamplerConfig(influential=0),
    "boe-influential2": boe.SamplerConfig(influential=2),
    "boe-r2": boe.SamplerConfig(candidates=2),
    "boe-dense": boe.SamplerConfig(sparse_backward=False),
    "boe-no-tis": boe.SamplerConfig(use_tis=False),
    "boe-r50": boe.SamplerConfig(candidates=50),
    "boe-near-certain": boe.SamplerConfig(entropy_bound=6.0),  # nats: no pick left at 3 masked or fewer
}
# The adaptive rules at a few bounds, and adaptive BoE in the configurations that change how it picks.
ADAPTIVE_CONFIGS = {
    "entropy-bound-0": ("entropy-bound", boe.SamplerConfig(entropy_bound=0.0)),
    "entropy-bound-1": ("entropy-bound", boe.SamplerConfig(entropy_bound=1.0)),
    "threshold-0.5": ("threshold", boe.SamplerConfig(confidence_threshold=0.5)),
    "boe-adaptive-1": ("boe-adaptive", boe.SamplerConfig(entropy_bound=1.0)),
    "boe-adaptive-always": ("boe-adaptive", boe.SamplerConfig(adaptive_pick="always")),
    "boe-adaptive-tangent": ("boe-adaptive", boe.SamplerConfig(estimator="tangent", influential=0)),
    "boe-adaptive-paper": ("boe-adaptive", dataclasses.replace(boe.PAPER_BOE, candidates=2)),
    "boe-adaptive-no-tis": ("boe-adaptive", boe.SamplerConfig(use_tis=False)),
}
# A rule passed as a function, one that runs passes of its own: experiments.py's exact lookahead.
LOOKAHEADS = {"lookahead": experiments.lookahead(), "lookahead-k50": experiments.lookahead(k=50)}
RULES = ([(order, boe.SamplerConfig()) for order in ALL_ORDERS] + [("boe", cfg) for cfg in BOE_CONFIGS.values()]
         + [(rule, boe.SamplerConfig()) for rule in LOOKAHEADS.values()] + list(ADAPTIVE_CONFIGS.values()))
RULE_IDS = ALL_ORDERS + list(BOE_CONFIGS) + list(LOOKAHEADS) + list(ADAPTIVE_CONFIGS)
def partly_masked_prompts(n=6, seed=3):
    """Task prompts with a random part of the answer given, so rows have different masked counts."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = boe.make_instances(n, seed)
    given = torch.rand(prompts.shape, generator=gen) < 0.3  # [n, L]
    return torch.where(given, answers, prompts)  # [n, L]


@pytest.mark.parametrize("order, cfg", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("steps", [1, 3, 20])
def test_sampler_keeps_prompt_reveals_each_mask_once_and_follows_schedule(order, cfg, steps):
    model = random_model()
    prompts = partly_masked_prompts()
    tokens, record = boe.generate(model, prompts, steps, order, cfg)
    masked = prompts == boe.MASK  # [n, L]
    assert torch.equal(tokens[~masked], prompts[~masked]), "prompt tokens changed"
    assert not (tokens == boe.MASK).any(), "a [MASK] was left or committed"
    reveal_step = record["reveal_step"]
    assert (reveal_step[~masked] == -1).all() and (reveal_step[masked] >= 0).all()
    for row in range(len(prompts)):
        left = int(masked[row].sum())
        for t in range(steps):
            floor = math.ceil(left / (steps - t)) if left else 0  # the fixed schedule's budget
            revealed = int((reveal_step[row] == t).sum())
            if order in ADAPTIVE_ORDERS:  # the schedule is their floor, so they finish within `steps`
                assert floor <= revealed <= left and (revealed > 0 or not left), f"row {row} step {t}"
            else:
                assert revealed == floor, f"row {row} step {t}"
            left -= revealed
        assert left == 0 and record["forwards"][row] >= int(reveal_step[row].max()) + 1


@pytest.mark.parametrize("order, cfg", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_rows_alone_and_seed_repeats(order, cfg, temperature):
    model = random_model(torch.float64)  # float64: batched and single matmuls agree to the last bit that matters
    prompts = partly_masked_prompts()
    cfg = dataclasses.replace(cfg, temperature=temperature)
    tokens, record = boe.generate(model, prompts, 3, order, cfg, seed=11)
    again, _ = boe.generate(model, prompts, 3, order, cfg, seed=11)
    assert torch.equal(tokens, again)
    for row in range(len(prompts)):
        alone, alone_record = boe.generate(model, prompts[row : row + 1], 3, order, cfg, seed=11 + row)
        assert torch.equal(alone[0], tokens[row]), f"row {row} differs alone"
        for count in ("forwards", "backwards"):
            assert alone_record[count][0] == record[count][row], f"row {row} is charged differently alone"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("order, cfg", RULES, ids=RULE_IDS)
def test_generate_on_gpu_matches_cpu(order, cfg):
    model = random_model(torch.float64)  # float64: the two devices agree far below any score gap
    prompts = partly_masked_prompts()
    tokens, record = boe.generate(model, prompts, 3, order, cfg)
    gpu_tokens, gpu_record = boe.generate(model.cuda(), prompts.cuda(), 3, order, cfg)
    assert torch.equal(gpu_tokens.cpu(), tokens)
    assert torch.equal(gpu_record["reveal_step"].cpu(), record["reveal_step"])


@pytest.mark.parametrize("order, ranking", [("left-to-right", [9, 10, 11, 12]), ("confidence", [12, 9, 10, 11]),
                                            ("margin", [12, 10, 11, 9]), ("entropy", [12, 9, 11, 10])])
def test_a_baseline_ranks_the_masked_positions_as_its_name_says(order, ranking):
    # Four masked positions whose confidence, margin and entropy orders all differ:
    #   position  probabilities            confidence  margin  entropy
    #    9        0.50, 0.50                   0.50      0.00     0.69
    #   10        0.45, 0.10 x 5, 0.05         0.45      0.35     1.66
    #   11        0.34, 0.33, 0.33             0.34      0.01     1.10
    #   12        0.90, 0.10                   0.90      0.80     0.33
    tokens = boe.make_instances(1, seed=0)[0]  # [1, L]
    tokens[0, 13:] = boe.SEP  # given: only 9 to 12 are masked
    masked = tokens == boe.MASK  # [1, L]
    probs = torch.nn.functional.one_hot(tokens.clamp_max(boe.MASK - 1), boe.MASK + 1).float()  # [1, L, V]
    for position, head in ((9, [0.5, 0.5]), (10, [0.45] + [0.1] * 5 + [0.05]), (11, [0.34, 0.33, 0.33]),
                           (12, [0.9, 0.1])):
        probs[0, position] = torch.tensor(head + [0.0] * (boe.MASK + 1 - len(head)))
    step = boe.Step(None, tokens, masked, probs, torch.ones(1, dtype=torch.long), 1.0, boe.SamplerConfig(),
                    [torch.Generator()], torch.zeros(1, dtype=torch.long))
    scores = boe.ORDER_RULES[order](step)  # [1, L]
    assert scores.masked_fill(~masked, -math.inf).argsort(dim=1, descending=True, stable=True)[0, :4].tolist() == ranking


def test_sampling_at_high_temperature_never_commits_mask():
    model = random_model()
    prompts, _ = boe.make_instances(50, 0)
    tokens, _ = boe.generate(model, prompts, 3, "confidence", boe.SamplerConfig(temperature=50.0))
    assert not (tokens == boe.MASK).any()


def test_forward_and_backward_counts_are_as_documented():
    model = random_model()
    prompts, _ = boe.make_instances(4, 0)  # 9 masked positions per row
    steps = 3  # budgets 3, 3, 3: the last step has no choice to make
    _, plain = boe.generate(model, prompts, steps, "confidence")
    assert plain["forwards"].tolist() == [steps] * 4 and plain["backwards"].tolist() == [0] * 4
    # BoE at the state: the step's own forward is differentiated, one backward per step with a choice.
    _, fused = boe.generate(model, prompts, steps, "boe")
    assert fused["forwards"].tolist() == [steps] * 4 and fused["backwards"].tolist() == [2] * 4
    # One reveal per step: BoE reveals by confidence and runs no backward.
    _, single = boe.generate(model, prompts, 9, "boe")
    assert single["forwards"].tolist() == [9] * 4 and single["backwards"].tolist() == [0] * 4
    # The paper's surrogate: one surrogate forward and one backward per step with a choice and probes.
    _, paper = boe.generate(model, prompts, steps, "boe", dataclasses.replace(boe.PAPER_BOE, candidates=4))
    assert paper["forwards"].tolist() == [steps + 2] * 4 and paper["backwards"].tolist() == [2] * 4
    # With r <= the budget the paper's rule picks every candidate, the budget's most confident, whatever TIS
    # says: no surrogate and no backward, and the reveals are confidence's.
    narrow_tokens, narrow = boe.generate(model, prompts, steps, "boe", dataclasses.replace(boe.PAPER_BOE, candidates=2))
    assert narrow["forwards"].tolist() == [steps] * 4 and narrow["backwards"].tolist() == [0] * 4
    assert torch.equal(narrow_tokens, boe.generate(model, prompts, steps, "confidence")[0])
    # With r = 8, step 2 (6 masked) has every masked position as a candidate: no probes, no surrogate.
    _, wide = boe.generate(model, prompts, steps, "boe", boe.PAPER_BOE)
    assert wide["forwards"].tolist() == [steps + 1] * 4 and wide["backwards"].tolist() == [1] * 4
    _, look = boe.generate(model, prompts, steps, experiments.lookahead())
    # Lookahead over every masked position: 9 then 6 candidate forwards.
    assert look["forwards"].tolist() == [steps + 9 + 6] * 4
    _, look_k = boe.generate(model, prompts, steps, experiments.lookahead(k=4))
    assert look_k["forwards"].tolist() == [steps + 4 + 4] * 4
    # Where the entropy bound would reveal every masked position, nothing is left to steer: no backward.
    _, loose = boe.generate(model, prompts, steps, "boe", boe.SamplerConfig(entropy_bound=math.inf))
    assert loose["forwards"].tolist() == [steps] * 4 and loose["backwards"].tolist() == [0] * 4
    # Adaptive BoE with an unbounded entropy bound reveals everything at once: one forward, no backward.
    _, all_at_once = boe.generate(model, prompts, 9, "boe-adaptive", boe.SamplerConfig(entropy_bound=math.inf))
    assert all_at_once["forwards"].tolist() == [1] * 4 and all_at_once["backwards"].tolist() == [0] * 4
    # With a zero bound it reveals one token a step, and picks it where a pick can save more forwards than its
    # backward costs: n - 2 > backward_cost with n masked, so at 9 down to 5 masked at the default price of 2,
    # and at 9 down to 3 for free (with 2 left the other follows at the next step, whichever goes first).
    _, one_a_step = boe.generate(model, prompts, 9, "boe-adaptive", boe.SamplerConfig(entropy_bound=0.0))
    assert one_a_step["forwards"].tolist() == [9] * 4 and one_a_step["backwards"].tolist() == [5] * 4
    _, free = boe.generate(model, prompts, 9, "boe-adaptive", boe.SamplerConfig(entropy_bound=0.0, backward_cost=0.0))
    assert free["forwards"].tolist() == [9] * 4 and free["backwards"].tolist() == [7] * 4


@pytest.mark.parametrize("order, cfg", [("confidence", boe.SamplerConfig()), (LOOKAHEADS["lookahead"], boe.SamplerConfig()),
                                        ("boe", boe.SamplerConfig())] + [("boe", cfg) for cfg in BOE_CONFIGS.values()]
                         + list(ADAPTIVE_CONFIGS.values()),
                         ids=["confidence", "lookahead", "boe"] + list(BOE_CONFIGS) + list(ADAPTIVE_CONFIGS))
def test_charged_passes_are_the_passes_that_run(order, cfg, monkeypatch):
    # Each row decoded alone: the forwards and backwards charged to it are the model forwards and
    # backward passes that really ran.
    model = random_model()
    ran = dict(forwards=0, backwards=0)
    forward_embeds, grad = model.forward_embeds, torch.autograd.grad

    def counted_forward(*args, **kwargs):
        ran["forwards"] += 1
        return forward_embeds(*args, **kwargs)

    def counted_grad(*args, **kwargs):
        ran["backwards"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(model, "forward_embeds", counted_forward)
    monkeypatch.setattr(torch.autograd, "grad", counted_grad)
    prompts = partly_masked_prompts()
    for row in range(len(prompts)):
        ran.update(forwards=0, backwards=0)
        _, record = boe.generate(model, prompts[row : row + 1], 3, order, cfg)
        assert (record["forwards"].item(), record["backwards"].item()) == (ran["forwards"], ran["backwards"])


@pytest.mark.parametrize("cfg", [boe.SamplerConfig(), boe.PAPER_BOE], ids=["default", "paper"])
def test_boe_step_scores_only_revealable_masked_positions(cfg):
    # A block-wise decoder passes the current block as `revealable`: the candidates, the choice and
    # every finite score stay inside it, whatever the caller then ranks.
    model = random_model()
    tokens = torch.full((3, boe.SEQ_LEN), boe.MASK)  # [B, L]
    tokens[:, : boe.PROMPT_LEN] = boe.make_instances(3, 0)[0][:, : boe.PROMPT_LEN]
    masked = tokens == boe.MASK  # [B, L]
    block = torch.zeros_like(masked)  # [B, L]
    block[:, boe.PROMPT_LEN : boe.PROMPT_LEN + 4] = True
    table = model.token_embedding.weight
    budget = torch.tensor([2, 3, 4])  # [B]; the last row reveals its whole block: no choice
    _, _, candidates, _, _, charged = boe.boe_influence(tokens, masked, budget, table, model.forward_embeds,
                                                        boe.MASK, cfg, block)
    assert not (candidates & ~block).any()
    assert charged.tolist() == [True, True, False]  # probes include the masked positions of later blocks
    _, scores, _, _ = boe.boe_step(tokens, masked, budget, table, model.forward_embeds, boe.MASK, cfg,
                                   revealable=block)
    assert torch.equal(scores > -math.inf, masked & block)


def rejects_its_active_rows(embeds, active=None):
    raise TypeError(f"this model wants active as a list, not a {type(active).__name__}")


def boe_step_args(**bad):
    model = random_model()
    tokens = partly_masked_prompts(2)
    args = dict(tokens=tokens, masked=tokens == boe.MASK, budget=torch.tensor([2, 2]),
                embedding=model.token_embedding.weight, logits_fn=model.forward_embeds, mask_id=boe.MASK,
                cfg=boe.SamplerConfig(), progress=1.0, revealable=None)
    args.update(bad)
    return args


@pytest.mark.parametrize("bad, error, match", [
    (dict(tokens=torch.zeros(2, 18)), TypeError, "tokens must be an int64 or int32 tensor"),
    (dict(tokens=torch.zeros(2, 18, dtype=torch.int16)), TypeError, "tokens must be an int64 or int32 tensor"),
    (dict(tokens=torch.zeros(2, 18, dtype=torch.uint8)), TypeError, "tokens must be an int64 or int32 tensor"),
    (dict(tokens=torch.full((2, 18), 99)), ValueError, "token ids must lie in"),
    (dict(tokens=torch.full((2, 18), 14)), ValueError, r"token ids must lie in \[0, V = 14\)"),  # V itself
    (dict(masked=torch.zeros(2, 18, dtype=torch.long)), TypeError, "masked must be a bool tensor"),
    (dict(masked=torch.zeros(2, 17, dtype=torch.bool)), TypeError, "masked must be a bool tensor"),
    (dict(masked=torch.ones(2, 18, dtype=torch.bool)), ValueError, "masked marks positions whose token"),
    (dict(revealable=torch.ones(2, 18)), TypeError, "revealable must be a bool tensor"),
    (dict(budget=2), TypeError, "budget must be an int64 or int32 tensor"),
    (dict(budget=torch.tensor([2.0, 2.0])), TypeError, "budget must be an int64 or int32 tensor"),
    (dict(budget=torch.tensor([2])), TypeError, "budget must be an int64 or int32 tensor"),
    (dict(budget=torch.tensor([0, 2], dtype=torch.uint8)), TypeError, "budget must be an int64 or int32 tensor"),
    (dict(budget=torch.tensor([-1, 2])), ValueError, "budget must be >= 0"),
    (dict(budget=torch.tensor([2, 2], device="meta")), TypeError, "budget must be .* on the device of tokens"),
    (dict(embedding=torch.zeros(14)), TypeError, "embedding must be"),
    (dict(embedding=torch.zeros(14, 32, device="meta")), ValueError, "put them on the model's device"),
    (dict(mask_id=14), ValueError, "mask_id must be an int"),
    (dict(progress=0.0), ValueError, "progress"),
    (dict(cfg=None), TypeError, "cfg must be a SamplerConfig"),
    (dict(cfg=boe.SamplerConfig(estimator="nrom")), ValueError, "estimator must be one of"),
    (dict(cfg=dataclasses.replace(boe.PAPER_BOE, candidates=0)), ValueError, "with candidates=0 .* there are none"),
    (dict(logits_fn=lambda embeds, active=None: random_model().forward_embeds(embeds, active) * math.nan), ValueError,
     r"logits_fn returned NaN or \+inf logits"),
    (dict(logits_fn=lambda embeds: embeds), TypeError, "logits_fn must take an `active` keyword"),
    (dict(logits_fn=lambda embeds, active=None: embeds @ "E"), TypeError, "unsupported operand"),  # its own error
    (dict(logits_fn=rejects_its_active_rows), TypeError, "wants active as a list"),  # its own error, about `active`
    (dict(logits_fn=lambda embeds, active=None: random_model().forward_embeds(embeds, active)[:, 1:]), TypeError,
     r"logits_fn must return float logits \[B, L, V\] with B, L = \(2, 18\)"),  # a row short, as a bad shift gives
    (dict(logits_fn=lambda embeds, active=None: embeds), TypeError,
     r"one logit per row of the embedding table \(V = 14\)"),
    (dict(logits_fn=lambda embeds, active=None: types.SimpleNamespace(logits=embeds)), TypeError,
     "logits_fn must return float logits"),
    (dict(logits_fn=lambda embeds, active=None: random_model().forward_embeds(embeds).detach()), ValueError,
     "carry no graph back to the input embeddings"),
    (dict(cfg=dataclasses.replace(boe.PAPER_BOE, candidates=3),
          logits_fn=lambda embeds, active=None: random_model().forward_embeds(embeds).detach()),
     ValueError, "carry no graph back to the input embeddings"),
    (dict(logits_fn=lambda embeds, active=None: random_model().forward_embeds(torch.zeros_like(embeds))),
     ValueError, "the logits do not depend on the input embeddings"),
    (dict(tokens=torch.zeros(2, 0, dtype=torch.long), masked=torch.zeros(2, 0, dtype=torch.bool)), ValueError,
     "tokens must hold at least one position"),
    (dict(tokens=torch.zeros(2, 18, dtype=torch.long, device="meta")), ValueError, "off the meta device"),
    (dict(adaptive="no"), TypeError, "adaptive must be a bool"),
    (dict(cfg=boe.SamplerConfig(candidates=2**63)), ValueError, r"candidates must be in \[0, 2\*\*31\)"),
    (dict(cfg=boe.SamplerConfig(influential=2**63)), ValueError, r"influential must be in \[0, 2\*\*31\)"),
    (dict(cfg=boe.SamplerConfig(lam=10**400)), ValueError, "lam must be >= 0 and finite in float32"),
    (dict(cfg=boe.SamplerConfig(gamma=1e39)), ValueError, "gamma must be >= 0 and finite in float32"),
    (dict(cfg=boe.SamplerConfig(entropy_bound=10**400)), ValueError, "entropy_bound must be >= 0"),
    (dict(cfg=dataclasses.replace(boe.PAPER_BOE, tau=1e-40)), ValueError, "tau must be > 0 and finite in float32"),
], ids=lambda x: None)
def test_bad_boe_step_input_gets_a_clear_error(bad, error, match):
    with pytest.raises(error, match=match):
        boe.boe_step(**boe_step_args(**bad))


@pytest.mark.parametrize("cfg", [boe.SamplerConfig(), dataclasses.replace(boe.PAPER_BOE, candidates=3)],
                         ids=["default", "paper-r3"])
def test_boe_under_inference_mode_gets_a_clear_error(cfg):
    # BoE's backward needs autograd, which torch.inference_mode() rules out for good (torch.no_grad() is fine).
    model = random_model()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not torch.inference_mode"):
        boe.boe_step(**boe_step_args(cfg=cfg))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not torch.inference_mode"):
        boe.generate(model, partly_masked_prompts(2), 3, "boe", cfg)
    with torch.no_grad():
        assert boe.boe_step(**boe_step_args(cfg=cfg))[3].any(), "a backward ran"


def test_boe_with_one_reveal_per_step_decodes_as_confidence():
    # A row that reveals one token a step never commits two at once, so lowering the entropy left buys
    # it nothing: BoE reveals by confidence there (boe_scores).
    model = random_model()
    prompts = partly_masked_prompts()
    steps = int((prompts == boe.MASK).sum(1).max())
    tokens, record = boe.generate(model, prompts, steps, "boe")
    confident, confident_record = boe.generate(model, prompts, steps, "confidence")
    assert torch.equal(tokens, confident) and torch.equal(record["reveal_step"], confident_record["reveal_step"])


def test_default_model_config_fits_the_task():
    cfg = boe.ModelConfig()
    assert (cfg.vocab_size, cfg.mask_id, cfg.seq_len) == (len(boe.TOKEN_CHARS), boe.MASK, boe.SEQ_LEN)


def test_prompt_without_masks_is_returned_unchanged():
    model = random_model()
    _, answers = boe.make_instances(2, 0)
    for order in ALL_ORDERS:
        tokens, record = boe.generate(model, answers, 4, order)
        assert torch.equal(tokens, answers) and record["forwards"].sum() == 0


# -----------------------------------------------------------------------------
# Adaptive rules: the entropy bound, the confidence threshold, adaptive BoE


def test_surrogate_sparse_tis_is_dense_autograd_with_rows_outside_candidates_and_probes_detached(monkeypatch):
    # At the surrogate the active rows are the candidates and the probes: the gradient reaches a candidate's
    # embedding through its own row as well as through the probes' attention to it.
    model = random_model(torch.float64)
    tokens = partly_masked_prompts()
    masked = tokens == boe.MASK  # [B, L]
    budget = torch.full((len(tokens),), 2)  # [B]
    table = model.token_embedding.weight  # [V, D]
    cfg = dataclasses.replace(boe.PAPER_BOE, candidates=4)
    logits, _, candidates, _, influence, charged = boe.boe_influence(tokens, masked, budget, table,
                                                                     model.forward_embeds, boe.MASK, cfg)
    assert charged.any()
    probes = boe.surrogate_probes(logits, masked, candidates, cfg) & charged[:, None]  # [B, L]
    reveal = boe.reveal_embeddings(logits, table, cfg)  # [B, L, D]
    surrogate = torch.where(candidates[..., None], reveal, model.embed(tokens)).detach()  # [B, L, D]
    delta = (reveal - table[boe.MASK]).detach() * candidates[..., None]  # [B, L, D]
    monkeypatch.setattr(boe, "active_query_attention",  # every layer: dense attention, other rows detached
                        lambda q, k, v, active, backend: attn_kernel.reference_attention(q, k, v, active))
    _, grad = boe.entropy_gradient(model.forward_embeds, surrogate, probes, boe.MASK, candidates | probes)
    want = boe.influence_scores(grad, delta, logits.softmax(-1), candidates, cfg) * charged[:, None]  # [B, L]
    assert torch.allclose(influence, want.to(influence), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_soft_reveal_is_the_table_weighted_by_p_to_the_one_over_tau(tau):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)  # [B, L, V]
    table = torch.randn(7, 4, generator=gen, dtype=torch.float64)  # [V, D]
    weights = logits.softmax(-1) ** (1 / tau)  # [B, L, V]
    want = weights / weights.sum(-1, keepdim=True) @ table  # [B, L, D]
    got = boe.reveal_embeddings(logits, table, boe.SamplerConfig(reveal="soft", tau=tau))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rho, kept", [(0.1, 2), (0.5, 9), (0.95, 17)])  # ceil(rho * 18); at 0.95 all 17 left
def test_surrogate_probes_are_the_ceil_rho_L_highest_entropy_masked_non_candidates(rho, kept):
    seq_len = 18
    logits = torch.zeros(1, seq_len, 5)  # [1, L, V]
    logits[0, :, 0] = torch.linspace(8.0, 0.0, seq_len)  # entropy rises with the position
    masked = torch.ones(1, seq_len, dtype=torch.bool)  # [1, L]
    candidates = torch.zeros(1, seq_len, dtype=torch.bool)  # [1, L]
    candidates[0, -1] = True  # the highest in entropy is a candidate, so no probe
    probes = boe.surrogate_probes(logits, masked, candidates, dataclasses.replace(boe.PAPER_BOE, rho=rho))
    want = torch.zeros(seq_len, dtype=torch.bool)  # [L]
    want[seq_len - 1 - kept : seq_len - 1] = True
    assert torch.equal(probes[0], want)


@pytest.mark.parametrize("bound", [0.0, 0.05, 0.3, 1.0, 5.0, math.inf])
def test_entropy_bound_count_is_the_longest_prefix_a_brute_force_accepts(bound):
    gen = torch.Generator().manual_seed(7)
    entropies = torch.rand(200, 9, generator=gen) ** 3 * 0.6  # [n, L] many small, some large
    masked = torch.rand(200, 9, generator=gen) < 0.7  # [n, L]
    counts = boe.entropy_bound_count(entropies, masked, bound)  # [n]
    for row in range(200):
        ascending = sorted(entropies[row][masked[row]].tolist())
        # every prefix size k whose entropies, all but the largest, sum to at most the bound
        accepted = [k for k in range(1, len(ascending) + 1) if sum(ascending[:k]) - ascending[k - 1] <= bound]
        assert counts[row] == max(accepted, default=0), f"row {row}"


class FixedPredictions(torch.nn.Module):
    """A stand-in MDM whose prediction at each position is fixed (logits [L, V]), whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.mask_id = logits, logits.shape[-1] - 1
        self.cfg = boe.ModelConfig(vocab_size=logits.shape[-1], mask_id=self.mask_id, seq_len=logits.shape[0])

    def forward(self, tokens):
        return self.logits.expand(len(tokens), *self.logits.shape)  # [B, L, V]


def test_threshold_reveals_every_position_at_least_tau_else_the_most_confident():
    confidence = torch.tensor([0.95, 0.5, 0.91, 0.6, 0.99, 0.7])  # [L] with 2 token values
    logits = torch.stack([confidence.log(), (1 - confidence).log(), torch.full_like(confidence, -1e9)], -1)  # [L, 3]
    model = FixedPredictions(logits)
    prompts = torch.full((1, 6), model.mask_id)  # [1, L]
    _, record = boe.generate(model, prompts, 6, "threshold", boe.SamplerConfig(confidence_threshold=0.9))
    assert record["reveal_step"][0].tolist() == [0, 3, 0, 2, 0, 1]  # three at once, then one a step by confidence


def test_threshold_reveals_a_confidence_equal_to_tau():
    # "At least tau": with tau = 1 (allowed) the certain positions go at once, not one a step.
    logits = torch.tensor([[0.0, -1e9, -1e9], [0.0, 0.0, -1e9], [-1e9, 0.0, -1e9], [0.0, 0.0, -1e9]])  # [L, 3]
    model = FixedPredictions(logits)  # confidences exactly 1, 1/2, 1, 1/2
    prompts = torch.full((1, 4), model.mask_id)  # [1, L]
    _, record = boe.generate(model, prompts, 4, "threshold", boe.SamplerConfig(confidence_threshold=1.0))
    assert record["reveal_step"][0].tolist() == [0, 1, 0, 2]
    _, record = boe.generate(model, prompts, 4, "threshold", boe.SamplerConfig(confidence_threshold=0.5))
    assert record["reveal_step"][0].tolist() == [0, 0, 0, 0]


def test_adaptive_boe_is_entropy_bound_wherever_it_does_not_pick():
    # "stuck": BoE picks only at a step where the bound admits one token; a row never stuck there is
    # decoded exactly as by the entropy bound, and is charged no backward.
    model = random_model()  # its entropies lie near log(13) = 2.56 nats
    prompts = partly_masked_prompts(12)
    picked = []
    for bound in (2.4, 2.6, 3.0):
        cfg = boe.SamplerConfig(entropy_bound=bound)
        tokens, record = boe.generate(model, prompts, 18, "boe-adaptive", cfg)
        bounded, bounded_record = boe.generate(model, prompts, 18, "entropy-bound", cfg)
        never = record["backwards"] == 0  # [n]
        assert torch.equal(tokens[never], bounded[never])
        assert torch.equal(record["reveal_step"][never], bounded_record["reveal_step"][never])
        picked += never.tolist()
    assert any(picked) and not all(picked), "the test needs rows that are stuck and rows that are not"


def reference_predictions(model, tokens, masked):
    """A reference decoder's step: the forward and the backward for every row, whatever the step needs.
    Logits [B, L, V] (float32, [MASK] at -inf), g = dH/de [B, L, D], probabilities and entropies [B, L]."""
    logits, grad = boe.entropy_gradient(model.forward_embeds, model.embed(tokens), masked, boe.MASK, masked)
    logits = logits.float()
    logits[..., boe.MASK] = -math.inf
    probs = logits.softmax(-1)  # [B, L, V]
    return logits, grad, probs, boe.entropy(probs)


def reference_boe_adaptive(model, prompts, bound, pick):
    """Adaptive BoE written out step by step, with the forward and the backward run for every row at every
    step whether or not it is needed: the entropy bound's count, and where BoE picks, its best-scoring
    masked position (but for the count - 1 the bound reveals anyway) first, then the rest in ascending entropy;
    it picks only with more than 2 + 2 positions masked (a pick saves n - 2 forwards at most, a backward costs
    2). Returns tokens and reveal steps."""
    tokens = prompts.clone()  # [B, L]
    reveal_step = torch.full(prompts.shape, -1)  # [B, L]
    for t in range(prompts.shape[1]):
        masked = tokens == boe.MASK  # [B, L]
        if not masked.any():
            break
        logits, grad, probs, own = reference_predictions(model, tokens, masked)
        count = boe.entropy_bound_count(own, masked, bound)  # [B]
        influence = grad.norm(dim=-1) * -probs.amax(-1).log() * masked  # [B, L] |g| (-log c), the default
        scores = boe.boe_scores(influence, masked, probs.max(-1).values, own, 1 - t / prompts.shape[1],
                                boe.SamplerConfig())  # [B, L]
        for b in range(len(tokens)):
            order = (-own[b]).masked_fill(~masked[b], -math.inf).argsort(descending=True, stable=True).tolist()
            if count[b] < masked[b].sum() and (pick == "always" or count[b] == 1) and masked[b].sum() > 4:
                settled = order[: int(count[b]) - 1]  # the bound reveals these anyway: no candidates
                best = max((i for i in order if i not in settled), key=lambda i: float(scores[b, i]))
                order = [best] + [i for i in order if i != best]
            for i in order[: int(count[b])]:
                tokens[b, i] = logits[b, i].argmax()
                reveal_step[b, i] = t
    return tokens, reveal_step


@pytest.mark.parametrize("pick", ["stuck", "always"])
def test_adaptive_boe_equals_a_reference_that_always_runs_the_backward(pick):
    # The skipped backward never changes the result: where it is skipped, nothing depends on it.
    model = random_model(torch.float64)
    prompts = partly_masked_prompts(10)
    for bound in (0.05, 0.5, 2.0, 3.0):  # 3.0 nats admits two positions at some steps: no pick there when "stuck"
        cfg = boe.SamplerConfig(entropy_bound=bound, adaptive_pick=pick)
        tokens, record = boe.generate(model, prompts, prompts.shape[1], "boe-adaptive", cfg)
        reference, reference_steps = reference_boe_adaptive(model, prompts, bound, pick)
        assert torch.equal(tokens, reference) and torch.equal(record["reveal_step"], reference_steps)
        assert (record["backwards"] < record["forwards"]).all(), "the last step never needs a backward"


def reference_boe_fixed(model, prompts, steps, bound):
    """Fixed-schedule BoE written out step by step, with the forward and the backward run for every row at
    every step: ceil(masked / steps left) reveals; where that leaves a choice and the entropy bound would not
    reveal every masked position, the best-scoring one first, then the rest by confidence. Returns tokens and
    reveal steps."""
    cfg = boe.SamplerConfig(entropy_bound=bound)
    table = model.token_embedding.weight  # [V, D]
    tokens = prompts.clone()  # [B, L]
    reveal_step = torch.full(prompts.shape, -1)  # [B, L]
    for t in range(steps):
        masked = tokens == boe.MASK  # [B, L]
        if not masked.any():
            break
        logits, grad, probs, own = reference_predictions(model, tokens, masked)
        confidence = probs.max(-1).values  # [B, L]
        delta = (table[logits.argmax(-1)] - table[boe.MASK]) * masked[..., None]  # [B, L, D]
        influence = boe.influence_scores(grad, delta, probs, masked, cfg)  # [B, L]
        scores = boe.boe_scores(influence, masked, confidence, own, (steps - t) / steps, cfg)  # [B, L]
        count = boe.entropy_bound_count(own, masked, bound)  # [B]
        for b in range(len(tokens)):
            left = int(masked[b].sum())
            budget = -(-left // (steps - t))
            order = confidence[b].masked_fill(~masked[b], -math.inf).argsort(descending=True, stable=True).tolist()
            if 2 <= budget < left and count[b] < left:
                best = int(scores[b].masked_fill(~masked[b], -math.inf).argmax())
                order = [best] + [i for i in order if i != best]
            for i in order[:budget]:
                tokens[b, i] = logits[b, i].argmax()
                reveal_step[b, i] = t
    return tokens, reveal_step


def test_fixed_boe_equals_a_reference_that_always_runs_the_backward():
    # The backward skipped where the entropy bound would reveal every masked position changes nothing but
    # the compute: the reference runs it there too, and ranks by confidence all the same.
    model = random_model(torch.float64)  # its entropies lie near log(13) = 2.56 nats
    prompts = partly_masked_prompts(10)
    backwards = []
    for bound in (0.05, 6.0, 40.0):
        tokens, record = boe.generate(model, prompts, 4, "boe", boe.SamplerConfig(entropy_bound=bound))
        reference, reference_steps = reference_boe_fixed(model, prompts, 4, bound)
        assert torch.equal(tokens, reference) and torch.equal(record["reveal_step"], reference_steps)
        backwards.append(int(record["backwards"].sum()))
    assert backwards[0] > backwards[1] > backwards[2] == 0, "the bounds must skip none, some and every backward"


# -----------------------------------------------------------------------------
# Bad input


def with_attrs(model, **attrs):
    for name, value in attrs.items():
        setattr(model, name, value)
    return model


@pytest.mark.parametrize("bad, error, match", [
    (dict(prompts=torch.full((2, 19), boe.MASK)), ValueError, "more than the model's seq_len"),
    (dict(prompts=torch.full((2, 18), float(boe.MASK))), TypeError, "int64"),
    (dict(prompts=torch.full((18,), boe.MASK)), TypeError, r"\[B, L\]"),
    (dict(prompts=torch.full((2, 18), 99)), ValueError, "token ids"),
    (dict(steps=0), ValueError, "steps must be"),
    (dict(steps=2.5), ValueError, "steps must be"),
    (dict(steps=True), ValueError, "steps must be"),
    (dict(cfg=None), TypeError, "cfg must be a SamplerConfig"),
    (dict(cfg=boe.SamplerConfig(temperature=-1.0)), ValueError, "temperature must be >= 0"),
    (dict(order="best"), ValueError, "unknown order rule 'best'"),
    (dict(order="lookahead"), ValueError, r"experiments.lookahead\(\)"),
    (dict(cfg=boe.SamplerConfig(candidates=-1)), ValueError, "candidates must be"),
    (dict(cfg=dataclasses.replace(boe.PAPER_BOE, rho=0.0)), ValueError, "rho must"),
    (dict(cfg=dataclasses.replace(boe.PAPER_BOE, rho=1.5)), ValueError, "rho must"),
    (dict(cfg=boe.SamplerConfig(tau=0.0)), ValueError, "tau must be > 0"),
    (dict(cfg=boe.SamplerConfig(rho=0.5)), ValueError, "rho < 1 caps the surrogate"),
    (dict(cfg=boe.SamplerConfig(linearize="midpoint")), ValueError, "linearize must be one of"),
    (dict(cfg=boe.SamplerConfig(reveal="hard")), ValueError, "reveal must be one of"),
    (dict(cfg=boe.SamplerConfig(estimator="curvature")), ValueError, "estimator must be one of"),
    (dict(cfg=boe.SamplerConfig(influential=-1)), ValueError, "influential must be"),
    (dict(order="entropy-bound", cfg=boe.SamplerConfig(entropy_bound=-0.1)), ValueError, "entropy_bound must be >= 0"),
    (dict(order="boe-adaptive", cfg=boe.SamplerConfig(entropy_bound=math.nan)), ValueError, "entropy_bound must be"),
    (dict(order="threshold", cfg=boe.SamplerConfig(confidence_threshold=0.0)), ValueError,
     r"confidence_threshold must be in \(0, 1\]"),
    (dict(order="threshold", cfg=boe.SamplerConfig(confidence_threshold=1.5)), ValueError, "confidence_threshold"),
    (dict(order="threshold", cfg=boe.SamplerConfig(confidence_threshold=math.nan)), ValueError, "confidence_threshold"),
    (dict(order="boe-adaptive", cfg=boe.SamplerConfig(adaptive_pick="sometimes")), ValueError,
     "adaptive_pick must be one of"),
    (dict(model=torch.nn.Linear(4, 4)), TypeError, "call boe_step"),
    (dict(model=random_model().to("meta")), ValueError, "put them on the same device"),
    (dict(cfg=boe.SamplerConfig(candidates=2.5)), TypeError, "candidates must be of type int"),
    (dict(cfg=boe.SamplerConfig(influential=True)), TypeError, "influential must be of type int"),
    (dict(cfg=boe.SamplerConfig(use_tis="no")), TypeError, "use_tis must be of type bool"),
    (dict(cfg=boe.SamplerConfig(sparse_backward=None)), TypeError, "sparse_backward must be of type bool"),
    (dict(cfg=boe.SamplerConfig(temperature="0")), TypeError, "temperature must be of type float"),
    (dict(cfg=boe.SamplerConfig(estimator=None)), TypeError, "estimator must be of type str"),
    (dict(cfg=boe.SamplerConfig(temperature=math.inf)), ValueError, "temperature must be >= 0 and finite"),
    (dict(cfg=dataclasses.replace(boe.PAPER_BOE, tau=math.inf)), ValueError, "tau must be > 0 and finite"),
    (dict(cfg=boe.SamplerConfig(gamma=math.nan)), ValueError, "gamma must be >= 0"),
    (dict(cfg=boe.SamplerConfig(lam=-1.0)), ValueError, "lam must be >= 0"),
    (dict(cfg=boe.SamplerConfig(h_max=math.inf)), ValueError, "h_max must be >= 0 and finite"),
    (dict(cfg=boe.SamplerConfig(backward_cost=-1.0)), ValueError, "backward_cost must be >= 0"),
    (dict(cfg=boe.SamplerConfig(temperature=1e-40)), ValueError, "temperature must be 0 .* or at least 1.18e-38"),
    (dict(order="confidence", cfg=boe.SamplerConfig(temperature=1e39)), ValueError,
     "temperature must be >= 0 and finite in float32"),
    (dict(seed=2**64), ValueError, "seed must be an integer"),
    (dict(seed=2**63 - 1), ValueError, "seed must be an integer"),  # row 1's seed would be 2**63
    (dict(seed=1.5), ValueError, "seed must be an integer"),
    (dict(seed=None), ValueError, "seed must be an integer"),
    (dict(seed=True), ValueError, "seed must be an integer"),
    (dict(prompts=boe.make_instances(2, 0)[0].to("meta")), ValueError, "meta device"),
    (dict(model=with_attrs(random_model(), mask_id=13.0)), ValueError, "mask_id must be an int"),
    (dict(model=with_attrs(random_model(), mask_id=20)), ValueError, "mask_id must be an int"),
    (dict(order="confidence", model=with_attrs(random_model(), forward=lambda tokens: torch.zeros(*tokens.shape, 5))),
     TypeError, r"the model must return float logits \[B, L, V\] = \(2, 18, 14\)"),
    (dict(order=lambda s: s.probs.max(-1).values[0]), TypeError, r"an order rule must return scores \[B, L\]"),
    (dict(order=lambda s: None), TypeError, r"an order rule must return scores \[B, L\]"),
    (dict(order=lambda s: s.probs.max(-1).values.to(torch.complex64)), TypeError,
     r"an order rule must return scores \[B, L\]"),
    (dict(order=lambda s: (s.probs.max(-1).values, None)), TypeError, "an order rule's how-many must be"),
    (dict(order=lambda s: (s.probs.max(-1).values, 2, 3)), TypeError, "a tuple of 3"),
])
def test_bad_generate_input_gets_a_clear_error(bad, error, match):
    args = dict(model=random_model(), prompts=boe.make_instances(2, 0)[0], steps=3, order="boe",
                cfg=boe.SamplerConfig(), seed=0)
    args.update(bad)
    with pytest.raises(error, match=match):
        boe.generate(args["model"], args["prompts"], args["steps"], args["order"], args["cfg"], args["seed"])



@pytest.mark.parametrize("order", ["confidence", "entropy-bound", "boe", "boe-adaptive"])
@pytest.mark.parametrize("bad", ["NaN", "+inf", "only [MASK]"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_model_whose_logits_give_no_distribution_gets_a_clear_error(order, bad, temperature):
    # Left alone, NaN logits would be committed as token 0 at the argmax, +inf ones turn the softmax into NaN, a
    # model with -inf for every token but [MASK] gets [MASK] committed at the argmax; sampling crashes inside
    # torch.multinomial on all three.
    model = random_model()
    with torch.no_grad():
        if bad == "only [MASK]":
            model.head.bias.fill_(-math.inf)
            model.head.bias[model.mask_id] = 0.0
        else:
            model.head.bias[3] = float(bad.lower())
    with pytest.raises(ValueError, match=r"NaN or \+inf logits, or -inf for every token but \[MASK\]"):
        boe.generate(model, partly_masked_prompts(2), 3, order, boe.SamplerConfig(temperature=temperature))


@pytest.mark.parametrize("order", ["confidence", "boe"])
def test_a_step_cap_past_int64_decodes_one_reveal_a_step(order):
    # The schedule's ceil(masked / steps_left) must not overflow int64 and reveal nothing, charging forwards.
    model = random_model()
    prompts = partly_masked_prompts()
    masked = (prompts == boe.MASK).sum(1)  # [n]
    tokens, record = boe.generate(model, prompts, boe.SEQ_LEN, order)
    for steps in (2**63, 2**70):
        huge, huge_record = boe.generate(model, prompts, steps, order)
        assert not (huge == boe.MASK).any() and torch.equal(huge_record["forwards"], masked)
        if order == "confidence":  # BoE's penalty floor follows steps_left / steps, so it may differ from L steps
            assert torch.equal(huge, tokens) and torch.equal(record["forwards"], masked)


@pytest.mark.parametrize("order", ["confidence", "boe", "boe-adaptive"])
def test_the_smallest_temperatures_commit_the_argmax(order):
    # Sampling from p ** (1 / T) tends to the argmax as T -> 0; dividing by T must not overflow on the way
    # (commit and the norm-surprisal weight both subtract the row's maximum first), also with logits far from 0.
    model = random_model()
    with torch.no_grad():
        model.head.bias += 100.0  # softmax ignores the shift; dividing by the tiniest T overflows float32
    prompts = partly_masked_prompts()
    argmax, _ = boe.generate(model, prompts, 3, order)
    for temperature in (torch.finfo(torch.float32).tiny, 1e-30, 1e-8):
        sampled, _ = boe.generate(model, prompts, 3, order, boe.SamplerConfig(temperature=temperature))
        assert torch.equal(sampled, argmax), temperature


def test_logits_at_minus_infinity_add_nothing_to_the_entropy_gradient():
    # A token a model never predicts (a padded vocabulary, log-probabilities of 0) has a logit of -inf; its
    # p log p is 0. The oracle: the same logits with that column at -1e4, whose probability underflows to 0.
    model = random_model(torch.float64)
    tokens = partly_masked_prompts()
    masked = tokens == boe.MASK  # [B, L]
    never = torch.arange(len(boe.TOKEN_CHARS)) == boe.SEP  # [V] a token no answer position holds

    def with_column_at(value):
        return lambda embeds, active=None: model.forward_embeds(embeds, active).masked_fill(never, value)

    embeds = model.embed(tokens).detach()  # [B, L, D]
    _, exact = boe.entropy_gradient(with_column_at(-1e4), embeds, masked, boe.MASK)
    _, got = boe.entropy_gradient(with_column_at(-math.inf), embeds, masked, boe.MASK)
    assert got.isfinite().all() and torch.allclose(got, exact, rtol=1e-12, atol=1e-15)
    args = (tokens, masked, torch.full((len(tokens),), 3), model.token_embedding.weight)
    finite = boe.boe_step(*args, with_column_at(-1e4), boe.MASK, boe.SamplerConfig())
    infinite = boe.boe_step(*args, with_column_at(-math.inf), boe.MASK, boe.SamplerConfig())
    assert infinite[3].any(), "a backward ran"
    assert torch.equal(finite[1] == math.inf, infinite[1] == math.inf), "the same picks"
    assert all(torch.equal(a, b) for a, b in zip(finite[2:], infinite[2:]))


@pytest.mark.parametrize("seed", range(20))
def test_top_masked_ranks_every_masked_position_above_the_rest(seed):
    # Whatever the values (-inf and NaN included, as a pasted caller may pass), the valid entries are the
    # `count` best masked positions, ranked by value with NaN and -inf lowest and ties to the left.
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-2, 3, (4, 7), generator=gen).double()  # [B, L] small integers: many ties
    special = torch.rand(values.shape, generator=gen)  # [B, L]
    values[special < 0.15] = -math.inf
    values[(special >= 0.15) & (special < 0.3)] = math.nan
    masked = torch.rand(values.shape, generator=gen) < 0.6  # [B, L]
    count = torch.randint(0, 8, (4,), generator=gen)  # [B]
    positions, valid = boe.top_masked(values, masked, count)
    for row in range(4):
        key = [(-(v if v == v and v > -math.inf else -1e300), i) for i, v in enumerate(values[row].tolist())]
        want = [i for _, i in sorted(k for k in key if masked[row, k[1]])][:int(count[row])]
        assert positions[row][valid[row]].tolist() == want


# -----------------------------------------------------------------------------
# The main job, end to end on a briefly trained model


def test_main_job_prints_every_rule_and_writes_json(tmp_path):
    # The main job as a user runs it: the attention backend on "auto", so the PyTorch path on a CPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "boe.py", "--instances", "30", "--steps", "3", "--json", str(out), "--train-steps", "30",
           "--cache", str(tmp_path / "m.pt")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {row["rule"] for row in rows} == set(boe.ORDERS) | {"lookahead", "boe (paper)"}
    assert {row["setting"] for row in rows if row["rule"] == "entropy-bound"} == {f"gamma {g}" for g in experiments.ENTROPY_BOUNDS}
    assert all(set(row) == {"rule", "setting", "steps", "accuracy", "ci95", "forwards", "backwards", "fwd_equiv",
                            "wall_s"} for row in rows)
    assert all(row["fwd_equiv"] == row["forwards"] + experiments.BACKWARD_COST * row["backwards"] for row in rows)
    assert "compute frontier" in result.stdout and result.stdout.count("   *") >= 1


def refusal(monkeypatch, capsys, *argv):
    """boe.py's main job run in this process with `argv`, expecting a refusal before any work: argparse's
    exit status 2 and no training. Returns stderr, for the message."""
    monkeypatch.setattr(sys, "argv", ["boe.py", *argv])
    with pytest.raises(SystemExit) as stop:
        boe.main()
    out = capsys.readouterr()
    assert stop.value.code == 2 and "train step" not in out.out, out.err
    return out.err


def test_main_job_fails_before_training_where_its_outputs_cannot_be_written(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"  # a file where the path wants a folder: unwritable, even for root
    blocker.write_text("")
    for outputs in (["--cache", str(blocker / "m.pt")], ["--cache", str(tmp_path)],
                    ["--json", str(blocker / "rows.json"), "--cache", str(tmp_path / "m.pt")]):
        assert "cannot write" in refusal(monkeypatch, capsys, "--train-steps", "30", *outputs)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("bad, message", [(["--temperature", "-1"], "--temperature must be"),
                                          (["--temperature", "inf"], "--temperature must be"),
                                          (["--temperature", "1e-45"], "--temperature must be"),
                                          (["--steps", "0"], "must be >= 1"),
                                          (["--train-seed", "-1"], "--train-seed must be in [0, 10**12)"),
                                          (["--train-seed", str(10**13)], "--train-seed must be in [0, 10**12)"),
                                          (["--eval-seed", "-5"], "--eval-seed must be in [0, 2**63)"),
                                          (["--eval-seed", str(2**63)], "--eval-seed must be in [0, 2**63)"),
                                          (["--instances", str(10**4 + 1)], "--instances must be at most 10**4"),
                                          (["--json", ""], "need a path"), (["--cache", ""], "need a path")])
def test_main_job_rejects_bad_options_before_training(tmp_path, monkeypatch, capsys, bad, message):
    assert message in refusal(monkeypatch, capsys, "--cache", str(tmp_path / "m.pt"), *bad)


def test_main_job_trains_other_settings_into_a_file_of_their_own(tmp_path, monkeypatch, capsys):
    # --train-steps other than the default must not overwrite the shipped weights of that seed.
    shipped = tmp_path / "marks-seed0.pt"
    monkeypatch.setattr(boe.TrainConfig, "cache", str(shipped))
    monkeypatch.setattr(sys, "argv", ["boe.py", "--train-steps", "20", "--instances", "2", "--steps", "2"])
    boe.main()
    assert "train step" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["marks-seed0-steps20.pt"]


def test_main_job_and_experiments_find_the_shipped_weights_from_any_folder(tmp_path):
    # Run from another folder, both find weights/ next to the code instead of training anew there; the main
    # job's weights file follows --train-seed (the suite's seed-2 model of the built-in task is shipped).
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs them: quicker
    for cmd in (["boe.py", "--instances", "2", "--steps", "2"], ["boe.py", "--instances", "2", "--steps", "2",
                "--train-seed", "2"], ["experiments.py", "show", "0", "--steps", "2"]):
        result = subprocess.run([sys.executable, os.path.join(here, cmd[0]), *cmd[1:]], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "train step" not in result.stdout, result.stderr
    assert not list(tmp_path.iterdir()), "nothing written where it ran"


def test_main_job_decodes_without_triton(tmp_path):
    # As on macOS or Windows, where there are no triton wheels: boe.py runs on the PyTorch path.
    result = run_without_triton("import runpy; runpy.run_path('boe.py', run_name='__main__')", "--train-steps",
                                "30", "--instances", "20", "--steps", "3", "--cache", str(tmp_path / "m.pt"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^boe\s+3 steps\s+\d\.\d{3}", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^boe-adaptive\s+gamma 0.1\s+\d\.\d{3}", result.stdout, re.MULTILINE), result.stdout


# -----------------------------------------------------------------------------
# BoE inside a model we did not write
#
# A stand-in written the way Hugging Face models are: the embedding table behind
# get_input_embeddings(), a forward that takes input_ids or inputs_embeds and returns an object with
# .logits, attention through torch.nn.functional.scaled_dot_product_attention with grouped
# key/value heads. It knows nothing of this project.


class StandInAttention(torch.nn.Module):
    def __init__(self, hidden, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = torch.nn.Linear(hidden, hidden)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * self.head_dim)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * self.head_dim)
        self.o_proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]
        k = self.k_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        v = self.v_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # [B, H, L, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))  # [B, L, hidden]


class StandInModel(torch.nn.Module):
    def __init__(self, vocab_size=24, hidden=32, heads=2, kv_heads=1, layers=3, max_len=40):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab_size, hidden)
        self.position = torch.nn.Parameter(0.1 * torch.randn(max_len, hidden))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden) for _ in range(2 * layers + 1))
        self.attentions = torch.nn.ModuleList(StandInAttention(hidden, heads, kv_heads) for _ in range(layers))
        self.mlps = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(),
                                                            torch.nn.Linear(2 * hidden, hidden)) for _ in range(layers))
        self.lm_head = torch.nn.Linear(hidden, vocab_size)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, hidden]
        x = x + self.position[: x.shape[1]]
        for i, (attention, mlp) in enumerate(zip(self.attentions, self.mlps)):
            x = x + attention(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return types.SimpleNamespace(logits=self.lm_head(self.norms[-1](x)))  # .logits [B, L, V]


STAND_IN_MASK = 23  # the stand-in's [MASK] id, its last token


def stand_in(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return StandInModel().to(dtype).eval()


def stand_in_state(seed=0, batch=3, length=20):
    """Tokens with a prompt of 6 and some of the rest masked, and the masked positions."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, STAND_IN_MASK, (batch, length), generator=gen)  # [B, L]
    hidden = (torch.rand(batch, length, generator=gen) < 0.7) & (torch.arange(length) >= 6)  # [B, L]
    tokens[hidden] = STAND_IN_MASK
    return tokens, tokens == STAND_IN_MASK


def routed_logits_fn(model):
    """The logits_fn a user writes for a Hugging Face model: its own SDPA calls routed while `active` is set."""
    def logits_fn(embeds, active=None):
        with attn_kernel.sdpa_active_rows(active, backend="torch") as counts:
            logits = model(inputs_embeds=embeds).logits  # [B, L, V]
        logits_fn.routed += counts["routed"]
        return logits
    logits_fn.routed = 0
    return logits_fn


def reference_sdpa(active):
    """SDPA with the reference semantics of the sparse adjoint: dense attention, inactive rows detached."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, L, Dh]
        return attn_kernel.reference_attention(q, k, v, active, scale)
    return sdpa


@pytest.mark.parametrize("cfg", [boe.SamplerConfig(sparse_backward=True),
                                 boe.SamplerConfig(estimator="tangent", sparse_backward=True),
                                 dataclasses.replace(boe.PAPER_BOE, candidates=4)],
                         ids=["default", "tangent", "paper-r4"])
def test_boe_step_on_a_hugging_face_style_model_matches_the_reference_semantics(cfg, monkeypatch):
    model = stand_in()
    tokens, masked = stand_in_state()
    budget = torch.full((len(tokens),), 3)  # [B]
    table = model.get_input_embeddings().weight  # [V, D]
    logits_fn = routed_logits_fn(model)
    logits, scores, _, charged = boe.boe_step(tokens, masked, budget, table, logits_fn, STAND_IN_MASK, cfg)
    assert charged.all()
    assert logits_fn.routed == len(model.attentions), "one routed SDPA call per attention layer"

    # The same step with every attention layer computing dense attention with inactive rows detached.
    reference = {}

    def reference_logits_fn(embeds, active=None):
        if active is not None:
            reference["active"] = active
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", reference_sdpa(active))
        try:
            return model(inputs_embeds=embeds).logits  # [B, L, V]
        finally:
            monkeypatch.undo()

    want_logits, want_scores, _, _ = boe.boe_step(tokens, masked, budget, table, reference_logits_fn, STAND_IN_MASK,
                                                  cfg)
    assert "active" in reference, "the step should have asked for active rows"
    assert torch.allclose(logits, want_logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(scores == math.inf, want_scores == math.inf), "the same picks"
    assert torch.allclose(scores, want_scores, rtol=1e-9, atol=1e-12)
    influence = boe.boe_influence(tokens, masked, budget, table, routed_logits_fn(model), STAND_IN_MASK, cfg)[4]
    want_influence = boe.boe_influence(tokens, masked, budget, table, reference_logits_fn, STAND_IN_MASK, cfg)[4]
    assert influence.abs().max() > 0 and torch.allclose(influence, want_influence, rtol=1e-9, atol=1e-12)


def test_entropy_gradient_through_routed_sdpa_equals_dense_autograd_with_inactive_rows_detached(monkeypatch):
    model = stand_in()
    tokens, masked = stand_in_state(seed=1)
    embeds = model.get_input_embeddings().weight[tokens].detach()  # [B, L, D]
    _, routed = boe.entropy_gradient(routed_logits_fn(model), embeds, masked, STAND_IN_MASK, masked)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", reference_sdpa(masked))
    _, want = boe.entropy_gradient(lambda e: model(inputs_embeds=e).logits, embeds, masked, STAND_IN_MASK)
    monkeypatch.undo()
    _, dense = boe.entropy_gradient(lambda e: model(inputs_embeds=e).logits, embeds, masked, STAND_IN_MASK)
    assert torch.allclose(routed, want, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(routed, dense, rtol=1e-3), "the active rows should change the gradient"


@pytest.mark.parametrize("call", [
    dict(is_causal=True),
    dict(attn_mask=torch.rand(2, 1, 8, 8) < 0.8),  # a boolean mask with False entries
    dict(attn_mask=torch.zeros(2, 1, 8, 8)),  # an additive mask: not served, even when zero
    dict(dropout_p=0.5),
    dict(key_len=5),  # cross-attention
    dict(batch=3),  # another batch than `active` describes
    dict(kv_heads=2),  # fewer key/value heads without enable_gqa: SDPA's own error
    dict(attn_mask=torch.ones(3, 1, 8, 8, dtype=torch.bool)),  # all true, but not of this batch: SDPA's own error
    dict(attn_mask=torch.ones(1, 2, 4, 8, 8, dtype=torch.bool)),  # all true, but broadcasts past [B, H, L, L]
], ids=["causal", "bool-mask", "float-mask", "dropout", "cross", "other-batch", "heads-no-gqa", "mask-other-batch",
        "mask-5d"])
def test_router_passes_calls_it_cannot_serve_through_unchanged(call):
    call = dict(call)
    batch, key_len, kv_heads = call.pop("batch", 2), call.pop("key_len", 8), call.pop("kv_heads", 4)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, 8, 16, generator=gen)  # [B, H, L, D]
    k, v = (torch.randn(batch, kv_heads, key_len, 16, generator=gen) for _ in range(2))
    active = torch.rand(2, 8, generator=gen) < 0.5  # [2, L]

    def sdpa():
        torch.manual_seed(1)  # dropout draws the same mask both times
        try:
            return F.scaled_dot_product_attention(q, k, v, **call)
        except RuntimeError as err:
            return str(err)

    plain = sdpa()
    with attn_kernel.sdpa_active_rows(active) as counts:
        routed = sdpa()
    assert counts == {"routed": 0, "passed": 1}
    assert routed == plain if isinstance(plain, str) else torch.equal(routed, plain)


def test_router_serves_an_all_true_mask_and_grouped_heads_exactly():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 8, 16, generator=gen, dtype=torch.float64, requires_grad=True)  # [B, H, L, D]
    k, v = (torch.randn(2, 2, 8, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    active = torch.rand(2, 8, generator=gen) < 0.5  # [B, L]
    with attn_kernel.sdpa_active_rows(active) as counts:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool),
                                             enable_gqa=True)  # [B, H, L, D]
    assert counts == {"routed": 1, "passed": 0}
    want = reference_sdpa(active)(q, k, v)  # [B, H, L, D]
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)  # [B, H, L, D]
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    assert all(torch.allclose(g, w, rtol=1e-10, atol=1e-12) for g, w in zip(grads, want_grads))


def test_router_refuses_an_active_set_that_is_not_a_bool_matrix():
    with pytest.raises(TypeError, match="active must be None or a bool tensor"):
        with attn_kernel.sdpa_active_rows(torch.ones(1, 4)):
            pass
    with attn_kernel.sdpa_active_rows(torch.ones(1, 4, dtype=torch.bool)) as counts:  # no heads: SDPA's own answer
        empty = F.scaled_dot_product_attention(*(torch.zeros(1, 0, 4, 16) for _ in range(3)))
    assert empty.shape == (1, 0, 4, 16) and counts == {"routed": 0, "passed": 1}


def test_router_restores_sdpa_on_exit_and_on_an_exception():
    original = F.scaled_dot_product_attention
    with attn_kernel.sdpa_active_rows(torch.ones(1, 4, dtype=torch.bool)):
        assert F.scaled_dot_product_attention is not original
    assert F.scaled_dot_product_attention is original
    with pytest.raises(KeyError):
        with attn_kernel.sdpa_active_rows(torch.ones(1, 4, dtype=torch.bool)):
            raise KeyError("inside")
    assert F.scaled_dot_product_attention is original
    with attn_kernel.sdpa_active_rows(None) as counts:  # nothing to route: SDPA untouched
        assert F.scaled_dot_product_attention is original
    assert counts == {"routed": 0, "passed": 0}


def test_router_routes_only_its_own_threads_calls_and_restores_sdpa_whatever_the_exit_order():
    # Two threads' blocks open and close in the order a, b, a-exits, b-exits; while they are open a third
    # thread calls SDPA with no block of its own. Each routed call follows its own thread's active set, the
    # third thread gets plain SDPA, and SDPA is torch's own again once the last block exits.
    original = F.scaled_dot_product_attention
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 8, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    actives = {"a": torch.rand(2, 8, generator=gen) < 0.5, "b": torch.rand(2, 8, generator=gen) < 0.5}
    events = {name: threading.Event() for name in ("a_in", "b_in", "a_out", "plain_done")}
    grads, counts = {}, {}

    def q_grad(out):
        return torch.autograd.grad(out.pow(2).sum(), q)[0]

    def block(name, wait_for, then_set, exit_after):
        events[wait_for].wait(10) if wait_for else None
        with attn_kernel.sdpa_active_rows(actives[name]) as counts[name]:
            events[then_set].set()
            events[exit_after].wait(10)
            grads[name] = q_grad(F.scaled_dot_product_attention(q, k, v))
        events[name + "_out"].set() if name == "a" else None

    def plain():
        events["b_in"].wait(10)
        grads["plain"] = q_grad(F.scaled_dot_product_attention(q, k, v))
        events["plain_done"].set()

    threads = [threading.Thread(target=block, args=("a", None, "a_in", "plain_done")),
               threading.Thread(target=block, args=("b", "a_in", "b_in", "a_out")),
               threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert F.scaled_dot_product_attention is original
    assert counts == {"a": {"routed": 1, "passed": 0}, "b": {"routed": 1, "passed": 0}}
    for name in ("a", "b"):
        assert torch.allclose(grads[name], q_grad(reference_sdpa(actives[name])(q, k, v)), rtol=1e-10, atol=1e-12)
    assert torch.allclose(grads["plain"], q_grad(original(q, k, v)), rtol=1e-10, atol=1e-12)


def test_an_inner_block_takes_over_from_an_outer_one_until_it_exits():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    outer_active, inner_active = torch.rand(1, 6, generator=gen) < 0.5, torch.ones(1, 6, dtype=torch.bool)
    with attn_kernel.sdpa_active_rows(outer_active) as outer:
        with attn_kernel.sdpa_active_rows(None) as silent:
            F.scaled_dot_product_attention(q, k, v)
        with attn_kernel.sdpa_active_rows(inner_active) as inner:
            F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, k, v)
    assert silent == {"routed": 0, "passed": 0} and inner == {"routed": 1, "passed": 0}
    assert outer == {"routed": 1, "passed": 0}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_router_under_autocast_computes_in_the_autocast_dtype_as_sdpa_does(dtype):
    # Under torch.autocast SDPA casts q, k, v to the autocast dtype, also when they differ: so does the router.
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 8, 16, generator=gen, requires_grad=True)  # [B, H, L, D] float32
    k, v = (torch.randn(2, 2, 8, 16, generator=gen).to(dtype) for _ in range(2))  # already in the autocast dtype
    active = torch.rand(2, 8, generator=gen) < 0.5  # [B, L]
    with torch.autocast("cpu", dtype=dtype):
        plain = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]
        with attn_kernel.sdpa_active_rows(active) as counts:
            routed = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]
    assert counts == {"routed": 1, "passed": 0} and routed.dtype == plain.dtype == dtype
    assert torch.allclose(routed.float(), plain.float(), atol=2e-2)
    (grad,) = torch.autograd.grad(routed.float().sum(), q)
    assert torch.equal(grad.abs().sum((1, 3)) > 0, active), "gradient through the active rows only"


def test_router_refuses_an_unknown_backend_on_entry():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with attn_kernel.sdpa_active_rows(torch.ones(1, 4, dtype=torch.bool), backend="cuda"):
            pass
    assert F.scaled_dot_product_attention is attn_kernel._SDPA


def readme_example(index=0):
    """The code of the index-th Python block of README.md's "Use it with your model" section."""
    readme = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    section = readme[readme.index("## Use it with your model"):readme.index("## Testing")]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)[index]


def test_readme_example_decodes_on_the_stand_in_and_keeps_the_prompt(monkeypatch):
    namespace = {}
    exec(readme_example(), namespace)
    model = stand_in(torch.float32, seed=3)
    backwards = []
    real_gradient = boe.probe_entropy_gradient
    monkeypatch.setattr(boe, "probe_entropy_gradient", lambda *args: backwards.append(1) or real_gradient(*args))
    prompt = torch.randint(0, STAND_IN_MASK, (2, 6), generator=torch.Generator().manual_seed(3))  # [B, P]
    tokens, routed = namespace["generate_boe"](model, prompt, STAND_IN_MASK, gen_length=16, block_length=8, steps=8)
    assert tokens.shape == (2, 22) and torch.equal(tokens[:, :6], prompt)
    assert not (tokens == STAND_IN_MASK).any()
    # Two blocks of 8 in 4 steps each: every step's forward is routed, and with 2 reveals a step the first 3
    # steps of a block run a backward.
    assert routed == 2 * 4 * len(model.attentions) and len(backwards) == 2 * 3


def test_readme_example_adaptive_stops_calling_the_model_when_a_block_is_done():
    namespace = {}
    exec(readme_example(), namespace)
    model = stand_in(torch.float32, seed=3)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    prompt = torch.randint(0, STAND_IN_MASK, (2, 6), generator=torch.Generator().manual_seed(3))  # [B, P]
    # An unbounded entropy bound reveals a whole block in its first step: one forward a block, each routed.
    cfg = boe.SamplerConfig(entropy_bound=math.inf)
    tokens, routed = namespace["generate_boe"](model, prompt, STAND_IN_MASK, gen_length=16, block_length=8,
                                               steps=8, cfg=cfg, adaptive=True)
    assert torch.equal(tokens[:, :6], prompt) and not (tokens == STAND_IN_MASK).any()
    assert len(calls) == 2 and routed == 2 * len(model.attentions)
    # The default bound: every step with something left in its block runs one forward, at most 4 a block.
    calls.clear()
    tokens, routed = namespace["generate_boe"](model, prompt, STAND_IN_MASK, gen_length=16, block_length=8,
                                               steps=8, adaptive=True)
    assert not (tokens == STAND_IN_MASK).any() and 2 <= len(calls) <= 8
    with pytest.raises(ValueError, match="multiple of block_length"):
        namespace["generate_boe"](model, prompt, STAND_IN_MASK, gen_length=16, block_length=5, steps=8)


def test_readme_next_position_logits_fn_gives_the_exact_gradient_through_one_layer():
    # Through one attention layer the sparse adjoint is exact when the active rows are every row whose
    # output the entropy reads. A model that predicts position i from row i - 1 (Dream) reads rows shifted
    # by one from the masked positions: the README's logits_fn shifts them, and without the shift the
    # gradient is wrong.
    torch.manual_seed(0)
    model = StandInModel(layers=1).double().eval()
    tokens, masked = stand_in_state(seed=4)
    embeds = model.get_input_embeddings().weight[tokens].detach()  # [B, L, D]
    namespace = {"model": model, "torch": torch, "sdpa_active_rows": attn_kernel.sdpa_active_rows}
    exec(readme_example(1), namespace)
    shifted = namespace["logits_fn"]
    _, exact = boe.entropy_gradient(shifted, embeds, masked, STAND_IN_MASK)  # dense: no active rows
    _, sparse = boe.entropy_gradient(shifted, embeds, masked, STAND_IN_MASK, active=masked)
    assert torch.allclose(sparse, exact, rtol=1e-9, atol=1e-12)

    def unshifted_rows(embeds, active=None):
        with attn_kernel.sdpa_active_rows(active):
            logits = model(inputs_embeds=embeds).logits  # [B, L, V]
        return torch.cat([logits[:, :1], logits[:, :-1]], 1)  # [B, L, V]
    _, wrong = boe.entropy_gradient(unshifted_rows, embeds, masked, STAND_IN_MASK, active=masked)
    assert not torch.allclose(wrong, exact, rtol=1e-3)


def test_boe_step_runs_when_pasted_with_the_pieces_its_docstring_lists():
    # boe_step's docstring says what a paste into another project needs: section 4 with `entropy`,
    # `top_masked`, `entropy_bound_count`, SamplerConfig and input_checks.py. Run exactly those, with
    # boe.py's imports, in a namespace of their own, and compare with boe.boe_step.
    source = open(boe.__file__).read()
    header = source[source.index("import argparse"):source.index("from attn_kernel import")]
    checks = open(input_checks.__file__).read()
    pieces = [inspect.getsource(obj) for obj in (boe.SamplerConfig, boe.entropy, boe.top_masked,
                                                 boe.entropy_bound_count)]
    section_4 = source[source.index("# 4. Backward-on-Entropy"):source.index("# 5. Main")]
    pasted = {"__name__": "pasted"}
    exec("\n\n".join([header, checks, *pieces, section_4]), pasted)
    model = random_model()
    prompts = partly_masked_prompts()
    masked = prompts == boe.MASK  # [B, L]
    budget = torch.full((len(prompts),), 2)  # [B]
    for adaptive in (False, True):
        args = (prompts, masked, budget, model.token_embedding.weight, model.forward_embeds, boe.MASK)
        ours = boe.boe_step(*args, boe.SamplerConfig(), adaptive=adaptive)
        theirs = pasted["boe_step"](*args, pasted["SamplerConfig"](), adaptive=adaptive)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
