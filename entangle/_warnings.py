"""The known, harmless warnings of the libraries the toolkit drives, filtered once for the CLI and the demo.

Only warnings whose cause is inside TRL or transformers and that a user cannot act on are listed; each entry names
what it silences. A library script calls :func:`filter_known_warnings` at start; library code never does.
"""

from __future__ import annotations

import warnings

# (category, message regex, module regex) of each known warning
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # TRL 1.16 reads ``model.is_gradient_checkpointing``, deprecated in transformers 5 (one per training step)
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)


def filter_known_warnings() -> None:
    """Ignore the :data:`KNOWN_WARNINGS` (and no other warning) from now on in this process."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
