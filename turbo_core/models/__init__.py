"""4D networks whose every SCM sub-attention runs through the dispatch."""
from .scm_net import CONFIGS, SCMNet, SCMNetConfig

__all__ = ["CONFIGS", "SCMNet", "SCMNetConfig"]
