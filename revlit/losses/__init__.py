"""Self-supervised losses on view-major embeddings (framework-free)."""

from revlit.losses.contrastive import (
    ContrastiveLoss,
    alignment,
    available,
    get_loss,
    nt_xent,
    nt_xent_multi,
)

__all__ = ["ContrastiveLoss", "alignment", "available", "get_loss", "nt_xent", "nt_xent_multi"]
