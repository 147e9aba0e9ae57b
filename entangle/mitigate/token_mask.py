"""Sparse token masking (THEORY.md §9; INTEGRATION.md §3, mitigation ii, in the style of SparsePO, 2410.05102).

The margin of a pairwise loss is taken over *token-weighted* log-probs ``s̃(y) = Σ_t m_t log π(y_t | x, y_<t)``
whose weights concentrate on the tokens where the chosen and rejected responses differ. Tokens that the two
responses share in the same context give near-identical per-token gradients (THEORY §7): they make up most of
``<g_w, g_l>``, and down-weighting them shrinks that inner product by up to ``w_shared²``.

- **Alignment weights** (:func:`alignment_weights`): the two responses' token ids are aligned by
  ``difflib.SequenceMatcher`` (longest matching blocks, no junk heuristic); a token inside a matching block gets
  ``shared`` ∈ [0, 1], every other token 1.
- **Learned weights** (:class:`TokenMask`, optional): one logit per vocabulary entry, ``m = σ(θ[y_t])``, multiplies
  the alignment weight; it is trained with the policy, with an L1 penalty ``mask_l1 · mean_t m_t`` over the batch's
  response tokens (the weights are positive, so the mean is their L1 norm per token).
- **Where the weights live**: in the batch. :func:`mask_batch` adds ``token_weights`` [N, L]; ``token_logps`` (and
  so every measurement: ``measure``, the exact twin, the probe's log-probs) multiplies each response token's
  log-prob by it. The objective is unchanged (any registered one, ``"sigmoid"`` for DPO) and its coefficients
  come from the masked log-probs, so ``pair_frame(measure(model, mask_batch(batch), ...), ...)`` describes the
  step token-masked training takes: that step is ``-(a_w ∇s̃_w + a_l ∇s̃_l)``. Token maps (``entangle.token_map``)
  stay per unweighted token; :func:`weighted_token_map` weights their cells (``inner · m_t · m_u``).
- **Training**: :class:`TokenMaskedDPOTrainer`, TRL's ``DPOTrainer`` whose loss is a registered objective of the
  masked log-probs (reference log-probs masked alike). With an :class:`~entangle.EntanglementCallback` attached it
  masks the callback's probe too, so the callback measures the gradients the step uses.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from entangle.capture.tokens.positions import pair_rows, response_positions
from entangle.metrics.objectives import check_hyper, resolve_objective

Tensor = torch.Tensor
DEFAULT_SHARED = 0.1


def alignment_weights(chosen: Sequence[int], rejected: Sequence[int], shared: float = DEFAULT_SHARED
                      ) -> tuple[Tensor, Tensor]:
    """Per-token weights (float32 [Tw], [Tl]) of two responses' token ids: ``shared`` on the tokens of the longest
    matching blocks of their alignment (``difflib.SequenceMatcher``, ``autojunk=False``), 1 elsewhere."""
    if not 0.0 <= shared <= 1.0:
        raise ValueError(f"shared must be in [0, 1], got {shared}")
    chosen, rejected = [int(t) for t in chosen], [int(t) for t in rejected]
    w_c, w_r = torch.ones(len(chosen)), torch.ones(len(rejected))
    for block in difflib.SequenceMatcher(None, chosen, rejected, autojunk=False).get_matching_blocks():
        w_c[block.a:block.a + block.size] = shared
        w_r[block.b:block.b + block.size] = shared
    return w_c, w_r


class TokenMask(torch.nn.Module):
    """Learned per-token weights ``m = σ(θ[token id])`` (one logit per vocabulary entry, all starting at ``init``).

    ``penalty(batch)`` is the L1 term: the mean weight over the batch's response tokens.
    """

    def __init__(self, vocab_size: int, init: float = 0.95):
        super().__init__()
        if not 0.0 < init < 1.0:
            raise ValueError(f"init must be in (0, 1), got {init}")
        self.logits = torch.nn.Parameter(torch.full((vocab_size,), math.log(init / (1 - init))))

    def forward(self, input_ids: Tensor) -> Tensor:
        """Weights [N, L] of the tokens ``input_ids`` [N, L]."""
        return torch.sigmoid(self.logits[input_ids])

    def penalty(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean learned weight over the response tokens of ``batch`` (a scalar with gradient)."""
        mask = batch["completion_mask"].to(torch.bool)
        return self(batch["input_ids"].to(self.logits.device))[mask.to(self.logits.device)].mean()


def token_weights(batch: Mapping[str, Tensor], shared: float = DEFAULT_SHARED, mask: TokenMask | None = None
                  ) -> Tensor:
    """Weights [2B, L] (float32) of a pair batch: alignment weights of each pair's responses (times ``mask``'s
    learned weights, with their gradient), 1 outside the responses (where ``token_logps`` reads nothing)."""
    ids = batch["input_ids"]
    weights = torch.ones(ids.shape, dtype=torch.float32)
    for pair in range(ids.shape[0] // 2):
        rows = pair_rows(batch, pair)
        pos = [response_positions(batch, r).cpu() for r in rows]
        aligned = alignment_weights(*(ids[r].cpu()[p].tolist() for r, p in zip(rows, pos, strict=True)), shared)
        for r, p, w in zip(rows, pos, aligned, strict=True):
            weights[r, p] = w
    weights = weights.to(ids.device)
    return weights if mask is None else weights * mask(ids.to(mask.logits.device)).to(ids.device)


def mask_batch(batch: Mapping[str, Tensor], shared: float = DEFAULT_SHARED, mask: TokenMask | None = None
               ) -> dict[str, Tensor]:
    """A copy of the pair batch with ``token_weights`` (:func:`token_weights`, detached): its log-probs, Gram
    matrices and per-pair frames are those of the token-masked margin. Any earlier ``token_weights`` is replaced."""
    with torch.no_grad():
        return {**batch, "token_weights": token_weights(batch, shared, mask)}


def weighted_token_map(frame: pd.DataFrame, batch: Mapping[str, Tensor]) -> pd.DataFrame:
    """A ``token_map`` frame of a pair with each cell weighted: columns ``weight_t``, ``weight_u`` (the tokens'
    weights in ``batch["token_weights"]``, see :func:`mask_batch`) and ``inner_masked = inner · weight_t · weight_u``.

    The ``wl`` block's ``inner_masked`` sums to ``<∇s̃_w, ∇s̃_l>``, the masked pair's Gram entry.
    """
    if "token_weights" not in batch:
        raise ValueError("batch has no token_weights: build it with mask_batch")
    pairs = frame["pair"].unique()
    if len(pairs) != 1:
        raise ValueError(f"weighted_token_map takes the frame of one pair; got pairs {sorted(pairs.tolist())}")
    rows = pair_rows(batch, int(pairs[0]))
    side = {s: batch["token_weights"][r, response_positions(batch, r)].double().cpu().numpy()
            for s, r in zip("wl", rows, strict=True)}
    out = frame.copy()
    out["weight_t"] = [side[b[0]][t] for b, t in zip(frame["block"], frame["t"], strict=True)]
    out["weight_u"] = [side[b[1]][u] for b, u in zip(frame["block"], frame["u"], strict=True)]
    out["inner_masked"] = out["inner"] * out["weight_t"] * out["weight_u"]
    return out


class _MaskedProbe(TrainerCallback):
    """Masks the probe of every ``EntanglementCallback`` of the trainer at train begin (after the callback has built
    its monitor) and, with a learned mask, before every step, with a reference recomputed at each measurement."""

    def __init__(self, trainer: TokenMaskedDPOTrainer):
        self.trainer = trainer

    def _mask(self, learned_only: bool) -> None:
        from entangle.integrations.callback import EntanglementCallback

        t = self.trainer
        if learned_only and t.token_mask is None:
            return
        for cb in t.callback_handler.callbacks:
            monitor = getattr(cb, "monitor", None) if isinstance(cb, EntanglementCallback) else None
            if monitor is not None and monitor.probe.batch is not None:
                monitor.probe.batch = mask_batch(monitor.probe.batch, t.shared, t.token_mask)
                monitor.fixed_reference = monitor.fixed_reference and t.token_mask is None

    def on_train_begin(self, args, state, control, **kwargs):
        self._mask(learned_only=False)

    def on_step_begin(self, args, state, control, **kwargs):
        self._mask(learned_only=True)


class TokenMaskedDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` (same arguments) training a registered objective on token-masked log-probs.

    Args (keyword, besides ``DPOTrainer``'s):
        shared: weight of the tokens the two responses share (:func:`alignment_weights`); ``None`` for no
            alignment mask (weights 1: then it trains ``objective`` on plain log-probs, e.g. ``"dpop"``).
        objective: a registered objective name (or list, with ``loss_weights``), by default DPO's ``"sigmoid"``;
            ``beta`` comes from the config.
        hyper: the objective's other hyper-parameters (``{"dpop_lambda": 50.0}``).
        learn_mask: also learn a :class:`TokenMask` (trained with the model, its own parameter group without
            weight decay) with the L1 penalty ``mask_l1 · mean weight``.

    The loss is the batch mean of the per-pair objective of ``s̃ = Σ_t m_t log π(y_t|·)`` for policy and reference,
    plus the penalty; reference log-probs come from ``ref_model`` or, for a PEFT model, the adapters disabled.
    ``precompute_ref_log_probs`` is refused with a mask (the precomputed ones are unmasked).
    """

    def __init__(self, *args: Any, shared: float | None = DEFAULT_SHARED, objective: Any = "sigmoid",
                 loss_weights: Sequence[float] | None = None, hyper: Mapping[str, Any] | None = None,
                 learn_mask: bool = False, mask_l1: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if shared is None and learn_mask:
            raise ValueError("learn_mask=True needs an alignment mask: pass shared= in [0, 1]")
        if (shared is not None or learn_mask) and self.precompute_ref_logps:
            raise ValueError("TokenMaskedDPOTrainer: precompute_ref_log_probs=True gives unmasked reference "
                             "log-probs; set it to False")
        if mask_l1 < 0:
            raise ValueError(f"mask_l1 must be >= 0, got {mask_l1}")
        self.shared, self.mask_l1 = shared, mask_l1
        self.objective = resolve_objective(objective, loss_weights)
        self.hyper = {**({"beta": self.beta} if "beta" in self.objective.hyper_names else {}), **(hyper or {})}
        check_hyper(self.objective, self.hyper)
        vocab = self.model.get_input_embeddings().num_embeddings
        self.token_mask = TokenMask(vocab).to(self.args.device) if learn_mask else None
        if shared is not None:
            self.add_callback(_MaskedProbe(self))

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.token_mask is not None and not any(p is self.token_mask.logits for g in optimizer.param_groups
                                                   for p in g["params"]):
            optimizer.add_param_group({"params": [self.token_mask.logits], "weight_decay": 0.0})
        return optimizer

    def _weights(self, inputs: Mapping[str, Tensor]) -> Tensor | None:
        if self.shared is None:
            return None
        return token_weights(inputs, self.shared, self.token_mask)[:, 1:]

    def _token_logps(self, model: Any, inputs: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        kwargs = {k: v for k, v in inputs.items()
                  if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        seq_len = inputs["completion_mask"].shape[1] - 1
        return model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Batch-mean objective of the token-masked log-probs (+ the mask's L1 penalty); logs margins."""
        if return_outputs:
            raise ValueError("TokenMaskedDPOTrainer.compute_loss does not return outputs")
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import use_adapter

        mode = "train" if self.model.training else "eval"
        comp = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(comp == 0, -100)
        weights = self._weights(inputs)
        per_token = self._token_logps(model, inputs, labels)
        logps = (per_token if weights is None else per_token * weights).sum(1)
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            with torch.no_grad():
                if is_peft_model(self.model) and self.ref_model is None:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        ref_token = self._token_logps(self.model, inputs, labels)
                else:
                    ref_token = self._token_logps(self.ref_model, inputs, labels)
                ref = (ref_token if weights is None else ref_token * weights.detach()).sum(1)
        lengths = comp[:, 1:].sum(1)
        (s_w, s_l), (r_w, r_l), (n_w, n_l) = logps.chunk(2), ref.chunk(2), lengths.chunk(2)
        loss = self.objective(s_w, s_l, ref_chosen_logps=r_w, ref_rejected_logps=r_l, chosen_lengths=n_w,
                              rejected_lengths=n_l, **self.hyper).mean()
        metrics = self._metrics[mode]
        if self.token_mask is not None:
            penalty = self.token_mask.penalty(inputs)
            loss = loss + self.mask_l1 * penalty
            metrics["mask/mean_weight"].append(penalty.item())
        margins = ((s_w - r_w) - (s_l - r_l)).detach()
        metrics["rewards/margins"].append(self.accelerator.gather(self.beta * margins).mean().item())
        metrics["rewards/accuracies"].append(self.accelerator.gather((margins > 0).float()).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(s_w.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(s_l.detach()).mean().item())
        return loss
