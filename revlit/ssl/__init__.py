"""Self-supervision for the reverse-attack defense: differentiable views, projection head, loss."""

from revlit.ssl.head import HEAD_FORMAT, SSLHead, load_head, save_head, ssl_loss
from revlit.ssl.views import SimCLRViews

__all__ = ["HEAD_FORMAT", "SSLHead", "SimCLRViews", "load_head", "save_head", "ssl_loss"]
