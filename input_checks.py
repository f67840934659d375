"""Input checks of boe.py's entry points (generate, boe_step): every bad input, and every bad output of
the model or logits_fn they call, gets an error that names it, before it reaches torch. They hold no
part of the method; a paste of boe_step takes this file along (boe_step's docstring). SamplerConfig's
own ranges are checked in boe.py (check_sampler_config, the end of section 4).
"""
import math
import numbers
import operator

import torch
import torch.nn as nn


def describe(x):
    return f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}"


def is_int_in(x, low, high):  # any integer type (int, numpy, 0-d integer tensor), not a float or a bool
    try:
        return not isinstance(x, bool) and low <= operator.index(x) <= high
    except TypeError:
        return False


def is_int_tensor(x, dim):  # int64 or int32: what torch indexes with (uint8 would be a mask, int8 wraps)
    return isinstance(x, torch.Tensor) and x.dim() == dim and x.dtype in (torch.int64, torch.int32)


def check_logits(logits, source):
    """Every position's logits [B, L, V] ([MASK] at -inf) must give a distribution to commit from."""
    if not logits.amax(-1).isfinite().all():  # amax is NaN where any logit is
        raise ValueError(f"{source} returned NaN or +inf logits, or -inf for every token but [MASK] (nothing to "
                         f"commit)")


def call_logits_fn(logits_fn, embeds, active=None, vocab=None):
    """logits_fn(embeds), or logits_fn(embeds, active=active); a clear error where it returns no logits
    [B, L, V] (with V = vocab where given)."""
    try:
        logits = logits_fn(embeds) if active is None else logits_fn(embeds, active=active)  # [B, L, V]
    except TypeError as err:
        if active is not None and "unexpected keyword argument 'active'" in str(err):  # Python's own words
            raise TypeError("logits_fn must take an `active` keyword (bool [B, L]: the rows the backward "
                            "follows; see attn_kernel.sdpa_active_rows), or set sparse_backward=False") from err
        raise
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != embeds.shape[:2] \
            or not logits.dtype.is_floating_point:
        raise TypeError(f"logits_fn must return float logits [B, L, V] with B, L = {tuple(embeds.shape[:2])}; got "
                        f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))} (for a Hugging Face "
                        f"model return model(...).logits)")
    if vocab is not None and logits.shape[-1] != vocab:  # a reveal is the embedding row of its logits' argmax
        raise TypeError(f"logits_fn must return one logit per row of the embedding table (V = {vocab}); got "
                        f"{logits.shape[-1]}")
    return logits


def check_model_output(logits, expected):
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected or not logits.dtype.is_floating_point:
        raise TypeError(f"the model must return float logits [B, L, V] = {expected}; got {describe(logits)}")


def check_rule_output(out, shape):
    """An order rule returns scores [B, L], or scores and how many to reveal, an integer tensor [B]."""
    scores, wanted = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(scores, torch.Tensor) or scores.shape != shape or scores.is_complex():
        raise TypeError(f"an order rule must return scores [B, L] = {tuple(shape)}, or (scores, how many [B]); got "
                        f"{describe(scores) if not isinstance(out, tuple) else f'a tuple of {len(out)}'}")
    if isinstance(out, tuple) and not (is_int_tensor(wanted, 1) and wanted.shape == shape[:1]):
        raise TypeError(f"an order rule's how-many must be an int64 or int32 tensor [B] = [{shape[0]}]; got "
                        f"{describe(wanted)}")


def check_generate_args(model, prompts, steps, order, orders, seed):
    if not (hasattr(model, "cfg") and hasattr(model, "mask_id")):
        raise TypeError(f"generate decodes with a model like this file's (.cfg, .mask_id); got {type(model).__name__}. "
                        f"For another model, call boe_step in a decoding loop of your own")
    if not isinstance(prompts, torch.Tensor) or prompts.dtype != torch.long or prompts.dim() != 2:
        raise TypeError(f"prompts must be an int64 tensor [B, L]; got {describe(prompts)}")
    if prompts.device.type == "meta":
        raise ValueError("prompts on the meta device hold no tokens to decode")
    mask_id, vocab = model.mask_id, model.cfg.vocab_size
    if not is_int_in(mask_id, 0, vocab - 1):
        raise ValueError(f"the model's mask_id must be an int in [0, vocab_size = {vocab}); got {mask_id!r}")
    weight = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if weight is not None and weight.device != prompts.device:
        raise ValueError(f"prompts are on {prompts.device} and the model on {weight.device}: put them on the same device")
    if prompts.shape[1] > model.cfg.seq_len:
        raise ValueError(f"prompts have {prompts.shape[1]} positions, more than the model's seq_len {model.cfg.seq_len}")
    if prompts.numel() and (prompts.min() < 0 or prompts.max() >= model.cfg.vocab_size):
        raise ValueError(f"prompt token ids must lie in [0, {model.cfg.vocab_size})")
    if not is_int_in(steps, 1, math.inf):
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not is_int_in(seed, -2**63, 2**63 - max(len(prompts), 1)):  # row b's generator is seeded with seed + b
        raise ValueError(f"seed must be an integer with seed + B - 1 within int64; got {seed!r}")
    if not callable(order) and order not in orders:
        moved = " (the exact lookahead is experiments.lookahead(), a function)" if order == "lookahead" else ""
        raise ValueError(f"unknown order rule {order!r}; choose one of {', '.join(orders)}{moved}")


def check_boe_step_args(tokens, masked, budget, embedding, mask_id, progress, revealable, adaptive):
    if not is_int_tensor(tokens, 2):
        raise TypeError(f"tokens must be an int64 or int32 tensor [B, L]; got {describe(tokens)}")
    if tokens.shape[1] == 0 or tokens.device.type == "meta":
        raise ValueError(f"tokens must hold at least one position, off the meta device; got {describe(tokens)} on "
                         f"{tokens.device}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be a bool; got {adaptive!r}")
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2 or not embedding.dtype.is_floating_point:
        raise TypeError("embedding must be the model's input embedding table, a float tensor [V, D]")
    if embedding.device != tokens.device:
        raise ValueError(f"tokens are on {tokens.device} and the embedding table on {embedding.device}: put them "
                         f"on the model's device")
    vocab = embedding.shape[0]
    if not is_int_in(mask_id, 0, vocab - 1):
        raise ValueError(f"mask_id must be an int in [0, V = {vocab}); got {mask_id!r}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, V = {vocab}), the rows of the embedding table")
    for name, mask in (("masked", masked), ("revealable", masked if revealable is None else revealable)):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != tokens.shape \
                or mask.device != tokens.device:
            raise TypeError(f"{name} must be a bool tensor of the shape of tokens {tuple(tokens.shape)}, on their "
                            f"device ({tokens.device}); got {describe(mask)}")
    if (masked & (tokens != mask_id)).any():
        raise ValueError(f"masked marks positions whose token is not mask_id {mask_id}")
    if not is_int_tensor(budget, 1) or budget.shape != tokens.shape[:1] or budget.device != tokens.device:
        raise TypeError(f"budget must be an int64 or int32 tensor [B] = [{tokens.shape[0]}] on the device of "
                        f"tokens; got {describe(budget)}")
    if budget.numel() and budget.min() < 0:
        raise ValueError("budget must be >= 0")
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real) or not 0 < progress <= 1:
        raise ValueError(f"progress (steps left / steps) must lie in (0, 1]; got {progress!r}")
