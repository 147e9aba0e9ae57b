"""Mitigations of gradient entanglement that train (THEORY §9): the pairwise normalised gradient
(:mod:`entangle.mitigate.pairwise`, with its TRL trainer in :mod:`entangle.mitigate.trainer`) and sparse token
masking (:mod:`entangle.mitigate.token_mask`)."""

from entangle.mitigate.pairwise import pairwise_normalized_backward, pairwise_normalized_loss
from entangle.mitigate.token_mask import TokenMaskedDPOTrainer, mask_batch, weighted_token_map  # noqa: F401

__all__ = ["pairwise_normalized_backward", "pairwise_normalized_loss"]
