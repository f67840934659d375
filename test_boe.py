"""Tests for boe.py: TIS against finite differences, the sparse adjoint against its dense reference,
sampler invariants for every order rule, and clear errors on bad input."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import attn_kernel
import boe

# The model's attention runs the pure-PyTorch ActiveQueryAttention here; the Triton path (interpreted
# on a CPU) is compared with it in test_kernel.py and in test_tis_same_with_triton_and_torch_backends.
boe.ATTENTION_BACKEND = "torch"

SMALL = boe.ModelConfig(n_layer=2, n_head=2, d_model=32)  # head size 16, the smallest the kernel takes


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
# Token Influence Score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tis_matches_central_finite_differences_in_float64(seed):
    model = random_model(torch.float64, seed)
    embeds, delta, probes = random_tis_inputs(model, seed)
    tis = boe.token_influence(model.forward_embeds, embeds, delta, probes, boe.MASK)  # [B, L]
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
    assert torch.allclose(tis, fd, rtol=1e-6, atol=1e-8 * fd.abs().max())


def test_tis_with_active_rows_equals_dense_autograd_with_inactive_rows_detached(monkeypatch):
    model = random_model(torch.float64)
    embeds, delta, probes = random_tis_inputs(model, seed=5)
    gen = torch.Generator().manual_seed(5)
    active = probes | (torch.rand(probes.shape, generator=gen) < 0.3)  # [B, L]
    sparse = boe.token_influence(model.forward_embeds, embeds, delta, probes, boe.MASK, active)
    # The reference: every attention layer's inactive output rows detached, dense autograd.
    monkeypatch.setattr(boe, "active_query_attention",
                        lambda q, k, v, active, backend: attn_kernel.reference_attention(q, k, v, active))
    reference = boe.token_influence(model.forward_embeds, embeds, delta, probes, boe.MASK, active)
    dense = boe.token_influence(model.forward_embeds, embeds, delta, probes, boe.MASK)
    assert torch.allclose(sparse, reference, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(sparse, dense, rtol=1e-3), "the active set should change the gradient"


def test_tis_is_the_same_when_called_under_no_grad():
    model = random_model(torch.float64)
    embeds, delta, probes = random_tis_inputs(model, seed=4)
    tis = boe.token_influence(model.forward_embeds, embeds, delta, probes, boe.MASK)
    with torch.no_grad():
        assert torch.equal(boe.token_influence(model.forward_embeds, embeds, delta, probes, boe.MASK), tis)


def test_forward_logits_unchanged_by_active_rows():
    model = random_model(torch.float64)
    embeds, _, probes = random_tis_inputs(model, seed=7)
    with torch.no_grad():
        assert torch.equal(model.forward_embeds(embeds, active=probes), model.forward_embeds(embeds))


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
        results[backend] = boe.token_influence(model.forward_embeds, embeds, delta, probes, boe.MASK, active)
    scale = results["torch"].abs().max()
    assert torch.allclose(results["triton"], results["torch"], rtol=1e-4, atol=1e-4 * scale)


# -----------------------------------------------------------------------------
# Samplers

ALL_ORDERS = list(boe.ORDER_RULES)
# Every order rule with its default settings, and BoE in the regimes the defaults do not reach on
# these prompts (with r = 8 and at most 8 masked positions there are never probes): a few candidates
# and probes, probes capped by rho, every masked position a candidate and a probe; and more candidates
# asked for than there are positions.
RULES = [(order, boe.SamplerConfig()) for order in ALL_ORDERS] + [
    ("boe", boe.SamplerConfig(candidates=2)),
    ("boe", boe.SamplerConfig(candidates=2, rho=0.1)),
    ("boe", boe.SamplerConfig(candidates=0)),
    ("boe", boe.SamplerConfig(candidates=50)),
    ("lookahead", boe.SamplerConfig(lookahead_k=50)),
]
RULE_IDS = ALL_ORDERS + ["boe-r2", "boe-r2-rho0.1", "boe-all", "boe-r50", "lookahead-k50"]


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
            expected = math.ceil(left / (steps - t)) if left else 0
            assert int((reveal_step[row] == t).sum()) == expected, f"row {row} step {t}"
            left -= expected


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


def test_candidates_rank_above_every_other_position_however_low_their_scores():
    candidates = torch.tensor([[True, False, True, False, False], [False] * 5])  # [2, 5]
    scores = torch.tensor([[-3e4, 9.0, -5e4, 9.0, 9.0], [0.0] * 5])  # [2, 5] far below any fixed offset
    confidence = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.5], [0.6, 0.2, 0.3, 0.9, 0.5]])  # [2, 5]
    ranked = boe.candidates_first(scores, candidates, confidence).argsort(1, descending=True)  # [2, 5]
    assert ranked[0].tolist() == [0, 2, 3, 4, 1]  # candidates by score, then the rest by confidence
    assert ranked[1].tolist() == [3, 0, 4, 2, 1]  # no candidates: confidence order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("order, cfg", RULES, ids=RULE_IDS)
def test_generate_on_gpu_matches_cpu(order, cfg):
    model = random_model(torch.float64)  # float64: the two devices agree far below any score gap
    prompts = partly_masked_prompts()
    tokens, record = boe.generate(model, prompts, 3, order, cfg)
    gpu_tokens, gpu_record = boe.generate(model.cuda(), prompts.cuda(), 3, order, cfg)
    assert torch.equal(gpu_tokens.cpu(), tokens)
    assert torch.equal(gpu_record["reveal_step"].cpu(), record["reveal_step"])


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
    _, boe_record = boe.generate(model, prompts, steps, "boe", boe.SamplerConfig(candidates=2))
    # BoE: per step with a choice, one surrogate forward and one backward on top of the plain forward.
    assert boe_record["forwards"].tolist() == [steps + 2] * 4
    assert boe_record["backwards"].tolist() == [2] * 4
    # With r = 8, step 2 (6 masked) has every masked position as a candidate: no probes, no surrogate.
    _, wide = boe.generate(model, prompts, steps, "boe", boe.SamplerConfig(candidates=8))
    assert wide["forwards"].tolist() == [steps + 1] * 4 and wide["backwards"].tolist() == [1] * 4
    _, look = boe.generate(model, prompts, steps, "lookahead")
    # Lookahead over every masked position: 9 then 6 candidate forwards.
    assert look["forwards"].tolist() == [steps + 9 + 6] * 4
    _, look_k = boe.generate(model, prompts, steps, "lookahead", boe.SamplerConfig(lookahead_k=4))
    assert look_k["forwards"].tolist() == [steps + 4 + 4] * 4


def test_default_model_config_fits_the_task():
    cfg = boe.ModelConfig()
    assert (cfg.vocab_size, cfg.mask_id, cfg.seq_len) == (len(boe.TOKEN_CHARS), boe.MASK, boe.SEQ_LEN)


def test_prompt_without_masks_is_returned_unchanged():
    model = random_model()
    _, answers = boe.make_instances(2, 0)
    for order in ALL_ORDERS:
        tokens, record = boe.generate(model, answers, 4, order)
        assert torch.equal(tokens, answers) and record["forwards"].sum() == 0


def test_lookahead_reveals_the_pivot_first_under_the_true_conditionals():
    """On the task the pivot settles every mark: an exact lookahead with exact probabilities must
    reveal it in the first step, and confidence, which reveals it last, fails with two steps. A hand-made
    predictor with the task's true conditionals stands in for a trained model."""

    class TrueConditionals(torch.nn.Module):
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

    prompts, _ = boe.make_instances(3, 0)
    tokens, record = boe.generate(TrueConditionals(), prompts, 3, "lookahead")
    assert (record["reveal_step"][:, 17] == 0).all(), "the pivot should be revealed first"
    tokens, _ = boe.generate(TrueConditionals(), prompts, 2, "confidence")
    assert not boe.check(tokens).any(), "confidence commits the last bits and the pivot together"


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad, error, match", [
    (dict(prompts=torch.full((2, 19), boe.MASK)), ValueError, "more than the model's seq_len"),
    (dict(prompts=torch.full((2, 18), float(boe.MASK))), TypeError, "int64"),
    (dict(prompts=torch.full((18,), boe.MASK)), TypeError, r"\[B, L\]"),
    (dict(prompts=torch.full((2, 18), 99)), ValueError, "token ids"),
    (dict(steps=0), ValueError, "steps must be"),
    (dict(steps=2.5), ValueError, "steps must be"),
    (dict(steps=True), ValueError, "steps must be"),
    (dict(cfg=None), TypeError, "cfg must be a SamplerConfig"),
    (dict(cfg=boe.SamplerConfig(temperature=-1.0)), ValueError, "temperature >= 0"),
    (dict(order="best"), ValueError, "unknown order rule 'best'"),
    (dict(cfg=boe.SamplerConfig(candidates=-1)), ValueError, "candidates must be"),
    (dict(cfg=boe.SamplerConfig(rho=0.0)), ValueError, "rho must"),
    (dict(cfg=boe.SamplerConfig(rho=1.5)), ValueError, "rho must"),
    (dict(cfg=boe.SamplerConfig(lookahead_k=-1)), ValueError, "lookahead_k"),
    (dict(cfg=boe.SamplerConfig(tau=0.0)), ValueError, "tau must"),
])
def test_bad_generate_input_gets_a_clear_error(bad, error, match):
    args = dict(prompts=boe.make_instances(2, 0)[0], steps=3, order="boe", cfg=boe.SamplerConfig())
    args.update(bad)
    with pytest.raises(error, match=match):
        boe.generate(random_model(), args["prompts"], args["steps"], args["order"], args["cfg"])


def test_corrupt_cache_is_retrained_with_a_message(tmp_path, capsys):
    cache = tmp_path / "model.pt"
    cache.write_bytes(b"not a checkpoint")
    train_cfg = boe.TrainConfig(steps=2, batch_size=8, cache=str(cache))
    model = boe.load_or_train(SMALL, train_cfg)
    assert "could not be loaded" in capsys.readouterr().out
    reloaded = boe.load_or_train(SMALL, train_cfg)  # now a valid cache: loaded, not retrained
    assert "train step" not in capsys.readouterr().out
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# The main job, end to end on a briefly trained model


def test_main_job_prints_every_order_rule_and_writes_json(tmp_path):
    # The main job as a user runs it: the attention backend on "auto", so the PyTorch path on a CPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "boe.py", "--train-steps", "30", "--instances", "40", "--steps", "3",
           "--cache", str(tmp_path / "m.pt"), "--json", str(out), "--full"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {row["order"] for row in rows} >= set(boe.ORDER_RULES)
    assert all(set(row) == {"order", "steps", "accuracy", "ci95", "fwd_equiv", "wall_s"} for row in rows)
    for order in boe.ORDER_RULES:
        assert order in result.stdout
    assert "tis vs surrogate" in result.stdout
    show = subprocess.run(cmd[:2] + ["--show", "0", "--steps", "3", "--cache", str(tmp_path / "m.pt"),
                                     "--train-steps", "30"], capture_output=True, text=True, timeout=300, env=env)
    assert show.returncode == 0 and "step 3:" in show.stdout, show.stderr
    tune = subprocess.run(cmd[:2] + ["--tune", "--instances", "8", "--steps", "2", "--cache", str(tmp_path / "m.pt"),
                                     "--train-steps", "30"], capture_output=True, text=True, timeout=300, env=env)
    assert tune.returncode == 0 and "candidates=" in tune.stdout, tune.stderr
