"""``PairwiseNormalizedDPOTrainer``: TRL 1.16's ``DPOTrainer`` training along the pairwise normalised direction.

::

    trainer = PairwiseNormalizedDPOTrainer(model=model, ref_model=ref, args=DPOConfig(...), train_dataset=...,
                                           processing_class=tok)      # DPOTrainer's arguments, unchanged
    trainer.train()

The loss is the one the config defines (``loss_type``, ``loss_weights``, ``beta``, ... read by
:func:`entangle.integrations.callback.trl_objective`, so any per-pair loss the registry reproduces; the others are
refused at construction); the reported loss is its value, the gradient is the direction of
:func:`entangle.pairwise_normalized_backward` (THEORY §9). The reference is TRL's (a reference model, the PEFT
policy with its adapters disabled, or precomputed ``ref_*_logps`` columns).

The forward pass: TRL calls the policy with its fused LM head (``fused_lm_head=True``), which never builds the
logits and whose head weight the engine's module hooks do not see. This trainer calls the policy the way entangle
measures instead: a plain forward returning the logits, in the engine's measurement mode (eval: no dropout, which
``DPOConfig.disable_dropout`` turns off anyway, and no gradient checkpointing). It costs the logits' memory
[2B, L, V] and the activations checkpointing would have saved. Evaluation is TRL's own loss.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from entangle.integrations.callback import trl_objective
from entangle.metrics.objectives import resolve_objective
from entangle.mitigate.pairwise import pairwise_normalized_loss

_BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")


class PairwiseNormalizedDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` (same arguments) whose training step follows the pairwise normalised gradient.

    Works with gradient accumulation (the step is the mean of the micro-batches' directions, as the loss would be),
    with PEFT (the adapters are the trained parameters whose gradient norms normalise) and with an
    :class:`~entangle.EntanglementCallback` attached (which measures the probe under the plain objective).

    Raises:
        ValueError: at construction, for a config whose loss is not a per-pair function of the summed log-probs
            (``aot``, WPO ``use_weighting``, f-divergences, ``ld_alpha``), or in a distributed run.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.accelerator.num_processes > 1:
            raise ValueError("PairwiseNormalizedDPOTrainer runs in one process: its forward pass bypasses the "
                             "distributed wrapper (DDP/FSDP/DeepSpeed), which would not synchronise the gradients")
        try:
            objective, weights, hyper = trl_objective(self)
        except ValueError as exc:
            raise ValueError(f"PairwiseNormalizedDPOTrainer cannot train this loss: {exc}") from exc
        declared = resolve_objective(objective, weights).hyper_names
        self.pairwise_objective = objective
        self.pairwise_loss_weights = weights
        self.pairwise_hyper = {k: v for k, v in hyper.items() if k in declared and v is not None}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The config's loss value, with the pairwise normalised direction as its gradient (training only)."""
        if return_outputs or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else model, inputs)
        ref = torch.cat([ref_chosen, ref_rejected]).detach()
        loss, frame = pairwise_normalized_loss(model, {k: inputs[k] for k in _BATCH_KEYS}, self.pairwise_objective,
                                               ref, loss_weights=self.pairwise_loss_weights, **self.pairwise_hyper)
        self._log_pairs(frame)
        return loss

    def _log_pairs(self, frame) -> None:
        """TRL's log-prob and reward metrics of the step, and the mean within-pair cosine it normalised."""
        metrics = self._metrics["train"]
        chosen = frame["logp_chosen"] - frame["ref_logp_chosen"]
        rejected = frame["logp_rejected"] - frame["ref_logp_rejected"]
        for key, values in (("logps/chosen", frame["logp_chosen"]), ("logps/rejected", frame["logp_rejected"]),
                            ("rewards/chosen", self.beta * chosen), ("rewards/rejected", self.beta * rejected),
                            ("rewards/accuracies", (chosen > rejected).astype(float)),
                            ("rewards/margins", self.beta * (chosen - rejected)),
                            ("pairwise/cosine", frame["cosine"])):
            values = self.accelerator.gather(torch.tensor(values.to_numpy(float), device=self.accelerator.device))
            metrics[key].append(values.float().mean().item())
