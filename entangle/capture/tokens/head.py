"""The output layer's per-token Gram matrix in closed form, without a backward pass (THEORY §7).

The gradient of ``l_t`` w.r.t. the head weight is ``(e_{y_t} - p_t) h_t^T``, so
``<grad l_t, grad l_u> = ((e_{y_t} - p_t) . (e_{y_u} - p_u)) (h_t . h_u)``. For tied input/output embeddings
(GPT-2, tied Llama) this is the head use of the shared matrix only: the input-embedding use and its cross terms
are left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..engine import measurement_mode
from ..logprobs import position_ids_from_mask
from ..params import ParamSpec, select_params, unwrap_model
from .positions import response_positions


def _head_hidden_and_probs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                           rows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Inputs h [K, d] of the output layer, probabilities p [K, V] and targets y [K] at the response tokens of ``rows``."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer (get_output_embeddings()); "
                         "method='head' needs one")
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        seen["h"], seen["z"] = args[0], output

    sub = {k: batch[k][list(rows)] for k in ("input_ids", "attention_mask")}
    handle = head.register_forward_hook(grab)
    try:
        with torch.no_grad():
            mask = sub["attention_mask"]
            out = model(input_ids=sub["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=False)
    finally:
        handle.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    if "z" not in seen or seen["z"].shape != logits.shape or not torch.equal(seen["z"], logits):
        raise ValueError(f"{type(model).__name__} transforms the output layer's result before returning logits "
                         "(scaling or soft-capping); the closed form of method='head' does not apply")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    hs, ps, ys = [], [], []
    for j, r in enumerate(rows):
        pos = response_positions(batch, r)
        hs.append(seen["h"][j, pos - 1].to(dtype))
        ps.append(torch.softmax(logits[j, pos - 1].to(dtype), -1))
        ys.append(batch["input_ids"][r, pos])
    return torch.cat(hs), torch.cat(ps), torch.cat(ys), head


def head_token_gram(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], rows: tuple[int, ...],
                    params: ParamSpec = None) -> torch.Tensor:
    """Closed-form per-token Gram matrix float64 [K, K] over the output-layer weight (no backward pass).

    ``<grad l_t, grad l_u> = (e_{y_t} - p_t) . (e_{y_u} - p_u) * (h_t . h_u)``, with
    ``(e_t - p_t) . (e_u - p_u) = [y_t = y_u] - p_t[y_u] - p_u[y_t] + p_t . p_u``. ``params``, if given, must
    select exactly the output-layer weight.
    """
    model = unwrap_model(model)
    if params is not None:
        named = select_params(model, params)
        head = model.get_output_embeddings()
        if head is None or len(named) != 1 or named[0][1] is not head.weight:
            raise ValueError(f"method='head' measures the output-layer weight only; params={params!r} selects "
                             f"{[n for n, _ in named][:5]}")
    with measurement_mode(model, []):
        h, p, y, _ = _head_hidden_and_probs(model, batch, rows)
    py = p[:, y]                                        # py[t, u] = p_t[y_u]
    err = (y[:, None] == y[None, :]).to(p.dtype) - py - py.T + p @ p.T
    return (err.to(torch.float64) * (h @ h.T).to(torch.float64))
