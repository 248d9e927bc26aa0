"""The tree space (METHOD.md 1.2): all trees the anchor can express, and single trees.

``graph`` builds, saves and loads the space (a networkx DiGraph with FLOPs per node);
``tree`` holds :class:`TreeSpec`, one parent choice per node; ``render`` shows a tree as
text or a picture. Nothing here imports network code or matplotlib at import time.
"""

from __future__ import annotations

from dymu.space.graph import (
    SCHEMA_VERSION,
    anchor_flops,
    anchor_params,
    build_space,
    costs,
    load_space,
    max_flops,
    min_flops,
    save_space,
    space_flops,
)
from dymu.space.render import tree_png, tree_text
from dymu.space.tree import TreeSpec, enumerate_trees

__all__ = [
    "SCHEMA_VERSION",
    "TreeSpec",
    "anchor_flops",
    "anchor_params",
    "build_space",
    "costs",
    "enumerate_trees",
    "load_space",
    "max_flops",
    "min_flops",
    "save_space",
    "space_flops",
    "tree_png",
    "tree_text",
]
