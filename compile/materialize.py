"""Materialize a derived tree as a plain inference ``nn.Module`` (DESIGN.md, Execution).

:class:`~dymu.space.treenet.TreeNet` runs any tree on the anchor's shared weights: it walks
the parent table on every call and applies the weight hypernet's BatchNorm offsets through
``functional_call``. That flexibility costs Python work and separate BatchNorm ops on every
call, and keeps the whole anchor alive. :func:`materialize` turns one (streams, tree,
offsets) into a self-contained module for export and deployment:

1. copy only the used nodes (stream ``j``'s layer ``l`` for node ``(l, j)``) and every head;
2. add the offsets to the BatchNorm affine parameters of the node they name, then, for a
   tree with widths, keep each node's first channels (:mod:`dymu.models.slim`);
3. fold every BatchNorm that directly follows a convolution into that convolution
   (:func:`fold_batchnorms`, torch's ``fuse_conv_bn_eval``);
4. precompute the order of node calls, so ``forward`` replays a fixed program with no
   routing logic, and returns ``{task name: output}`` exactly as ``TreeNet`` does.

The result is in eval mode with frozen parameters; the anchor is not modified.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dymu.models import slim
from dymu.models.anchor import Anchor
from dymu.models.backbones import BasicBlock
from dymu.models.streams import TreeStreams
from dymu.space.tree import TreeSpec

Node = tuple[int, int]
BNOffsets = Mapping[Node, Mapping[str, Tensor]]

_IMAGE = "image"
"""Name of the network input among the feature names of :class:`MaterializedTree`."""

_NAMED_CONV_BN: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
}
"""Conv -> BN pairs of blocks whose ``forward`` (not an ``nn.Sequential``) chains them.

Every other conv -> BN pair in dymu's backbones and heads sits side by side in an
``nn.Sequential`` (``_conv_bn_act``, ``_conv_bn_relu``, ``InvertedResidual.conv``, ResNet
stems and downsample shortcuts, ``ASPP.project``) and is found without a table. In both
cases the convolution's output feeds only the BatchNorm, which is what makes folding exact.
"""


def node_name(layer: int, stream: int) -> str:
    """Module name of node ``(layer, stream)`` in :attr:`MaterializedTree.nodes`."""
    return f"l{layer}_s{stream}"


def _conv_bn_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Every foldable ``(parent, conv name, bn name)``: the BN's only input is the conv's
    output, and the BN has running statistics to fold."""
    pairs = []
    for parent in module.modules():
        if type(parent) is nn.Sequential:  # a subclass may override forward
            names = [name for name, _ in parent.named_children()]
            candidates: Iterable[tuple[str, str]] = itertools.pairwise(names)
        else:
            candidates = _NAMED_CONV_BN.get(type(parent), ())
        for conv_name, bn_name in candidates:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.running_mean is not None  # else eval mode normalises per batch
            ):
                pairs.append((parent, conv_name, bn_name))
    return pairs


def fold_batchnorms(module: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a convolution into it, in place.

    Each pair becomes one convolution with the BN's eval-mode affine map in its weight and
    (new) bias, and the BN is replaced by ``nn.Identity`` so the owning block's ``forward``
    runs unchanged. A BN that no convolution precedes, or that has no running statistics,
    is left in place (it still computes the same thing in eval mode); none exists in dymu's
    current backbones and heads.

    Args:
        module: a module in eval mode (folding bakes in the running statistics).

    Returns:
        Names (as in ``module.named_modules()``) of the BatchNorms left in place.
    """
    if module.training:
        raise ValueError("fold_batchnorms needs a module in eval mode")
    for parent, conv_name, bn_name in _conv_bn_pairs(module):
        fused = fuse_conv_bn_eval(getattr(parent, conv_name), getattr(parent, bn_name))
        setattr(parent, conv_name, fused)
        setattr(parent, bn_name, nn.Identity())
    return [
        name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _bake_offsets(module: nn.Module, deltas: Mapping[str, Tensor], node: Node) -> None:
    """Add the hypernet's ``{parameter name: delta}`` to ``module``'s parameters, in place.

    ``TreeNet`` computes ``parameter + delta`` on every call; baking it once gives the same
    numbers and lets the offset BN be folded like any other.
    """
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in params:
                raise ValueError(
                    f"BN offset {name!r} of node {node} names no parameter of that layer; "
                    f"it has {sorted(params)}"
                )
            params[name].add_(delta.detach().to(params[name]))


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad`` off: the anchor itself is untouched."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def _set_statistics(module: nn.Module, stats: Mapping[str, Tensor] | None, node: Node) -> None:
    """Give a node in a narrowed context the BatchNorm statistics calibrated for its
    configuration."""
    if stats is None:
        raise ValueError(
            f"node {node} runs in a narrowed context: give its calibrated BatchNorm "
            "statistics (bn_stats, from TreeNet.calibrate)"
        )
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in stats.items():
            buffers[name].copy_(value)


def _input_channels(layer: nn.Module) -> int:
    """Channels a layer-0 node reads: its first convolution's input channels."""
    return next(m for m in layer.modules() if isinstance(m, nn.Conv2d)).in_channels


class MaterializedTree(nn.Module):
    """One tree as a fixed sequence of node calls followed by one call per head.

    Build it with :func:`materialize`. ``forward`` is straight-line: the loops below run
    over a program fixed at construction (:attr:`steps`, :attr:`head_inputs`), the same
    calls on every input, so tracing and export unroll them into a plain graph.

    Attributes:
        nodes: node name (``l{layer}_s{stream}``) -> that node's layer, BN folded.
        heads: task name -> head, BN folded.
        steps: ``(node name, name of its input)`` in execution order; the input is
            ``"image"`` for layer-0 nodes, else the parent node.
        head_inputs: ``(task name, high node, low node or None)`` in task order.
        tree_hash: :meth:`TreeSpec.hash` of the tree, for caches and export manifests.
        unfolded_bns: names of BatchNorms no convolution precedes (kept; see
            :func:`fold_batchnorms`); empty for dymu's backbones and heads.
    """

    def __init__(
        self,
        nodes: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        steps: list[tuple[str, str]],
        head_inputs: list[tuple[str, str, str | None]],
        tree_hash: str,
    ) -> None:
        super().__init__()
        self.nodes = nn.ModuleDict(nodes)
        self.heads = nn.ModuleDict(heads)
        self.steps = tuple(steps)
        self.head_inputs = tuple(head_inputs)
        self.tree_hash = tree_hash
        self.unfolded_bns: tuple[str, ...] = ()

    @property
    def task_names(self) -> list[str]:
        return [task for task, _, _ in self.head_inputs]

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Every task's head output for ``image`` ``[B, 3, H, W]``, keyed by task name."""
        size = (image.shape[-2], image.shape[-1])
        feats = {_IMAGE: image}
        for name, src in self.steps:
            feats[name] = self.nodes[name](feats[src])
        return {
            task: self.heads[task](feats[high], feats[low] if low is not None else None, size)
            for task, high, low in self.head_inputs
        }


def materialize(
    streams: TreeStreams | Anchor,
    tree: TreeSpec,
    bn_offsets: BNOffsets | None = None,
    bn_stats: Mapping[Node, Mapping[str, Tensor]] | None = None,
) -> MaterializedTree:
    """The inference module of ``tree`` on ``streams``, offsets baked in and BN folded.

    In eval mode its outputs equal ``TreeNet(streams, tree).eval()(image, bn_offsets)``
    (up to float rounding from folding).

    Args:
        streams: the trained weights and the private-node rule
            (:class:`~dymu.models.streams.TreeStreams`), or one anchor for every node (read
            only; the running statistics are used).
        tree: the tree to build; only its used nodes are copied.
        bn_offsets: the weight hypernet's output, ``{(layer, stream): {BN parameter name
            inside the layer: delta}}``; offsets of unused and private nodes are ignored.
        bn_stats: the statistics of every node in a narrowed context
            (:meth:`~dymu.space.treenet.TreeNet.calibrate` of this configuration); required
            when the tree narrows a node: those nodes' BatchNorms fold with them.

    Returns:
        A :class:`MaterializedTree` in eval mode with frozen parameters.
    """
    streams = TreeStreams.of(streams)
    sources = streams.sources(tree)  # [L][N] the weights of each node (and head); checks shape
    tree = tree.canonical()

    nodes: dict[str, nn.Module] = {}
    steps: list[tuple[str, str]] = []
    channels: dict[str, int] = {}  # node name -> its output channels, where widths slim them
    narrowed = tree.narrowed()  # [L][N]: nodes on the statistics of their configuration
    for layer, stream in tree.used_nodes():  # layer-major: parents come before children
        source = sources[layer][stream]
        module = _frozen_copy(source.streams[stream].layers[layer])
        adapted = bn_offsets is not None and streams.takes_offsets(source)
        deltas = bn_offsets.get((layer, stream)) if adapted else None
        if deltas:
            _bake_offsets(module, deltas, (layer, stream))
        name = node_name(layer, stream)
        parent = _IMAGE if layer == 0 else node_name(layer - 1, tree.parents[layer - 1][stream])
        if tree.widths is not None:  # offsets first: they are per channel of the full layer
            cin = channels.get(parent) or _input_channels(module)
            width = tree.width(layer, stream)
            channels[name] = slim.out_channels(module, cin, width)
            module = slim.slim(module, slim.skeleton(module, cin, width))
            if narrowed[layer][stream]:
                _set_statistics(module, (bn_stats or {}).get((layer, stream)), (layer, stream))
            module.eval().requires_grad_(False)
        nodes[name] = module
        steps.append((name, parent))

    heads: dict[str, nn.Module] = {}
    head_inputs: list[tuple[str, str, str | None]] = []
    for j, task in enumerate(streams.tasks):
        head = _frozen_copy(sources[tree.num_layers - 1][j].heads[task.name])
        path = tree.path(j)  # stream of task j's node at each layer
        low = head.low_layer
        high_name = node_name(tree.num_layers - 1, path[-1])
        low_name = node_name(low, path[low]) if low is not None else None
        if tree.widths is not None:
            low_c = channels[low_name] if low_name is not None else None
            sk = slim.head_skeleton(head, channels[high_name], low_c)
            head = slim.slim(head, sk).eval().requires_grad_(False)
        heads[task.name] = head
        head_inputs.append((task.name, high_name, low_name))

    net = MaterializedTree(nodes, heads, steps, head_inputs, tree.hash()).eval()
    net.unfolded_bns = tuple(fold_batchnorms(net))
    return net.eval()  # again: folding put fresh (training-mode) Identity modules in
