"""Self-supervision for the reverse-attack defense: differentiable views, projection head, loss."""

from revlit.ssl.head import (
    HEAD_DEFAULTS,
    HEAD_FORMAT,
    SSLHead,
    head_training,
    load_head,
    mean_ssl_loss,
    save_head,
    ssl_loss,
)
from revlit.ssl.views import SimCLRViews

__all__ = [
    "HEAD_DEFAULTS",
    "HEAD_FORMAT",
    "SSLHead",
    "SimCLRViews",
    "head_training",
    "load_head",
    "mean_ssl_loss",
    "save_head",
    "ssl_loss",
]
