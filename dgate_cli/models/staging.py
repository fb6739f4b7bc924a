"""Cutting a backbone into stages: one generic mechanism for every model.

The model is traced once with :mod:`torch.fx` (in eval mode). A *cut* is a point in the traced
program where exactly one activation tensor is alive: everything after it depends on the input only
through that tensor, so the program can be split there into two modules that, chained, compute
exactly what ``model(x)`` computes (same kernels, same order, bit for bit). Each cut is named by the
modules whose last operation it follows (``layer1``, ``layer1.2`` and ``layer1.2.relu`` may all name
one cut); the shortest alias is the canonical name.

Tensors that do not depend on the input (parameters read with ``get_attr``, position biases built
from them) never block a cut: they are recomputed in the stage that needs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import SpecError


@dataclass(frozen=True)
class Cut:
    """A place where a backbone can be split.

    Attributes:
        name: canonical module name (the outermost module ending here), e.g. ``"layer2"``.
        aliases: every module name that ends here, shortest first.
        order: position of the cut in execution order (0 = earliest).
    """

    name: str
    aliases: tuple[str, ...]
    order: int


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore each submodule's mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class StageGraph:
    """A traced backbone and the places it can be cut.

    Args:
        model: the backbone; traced in eval mode, left in the mode it was in.
        model_name: how errors name the model (the spec string), e.g. ``"cifar_resnet56"``.

    Example:
        >>> import torchvision
        >>> g = StageGraph(torchvision.models.resnet18(), "resnet18")
        >>> [c.name for c in g.resolve(["layer2", "layer1"])]
        ['layer1', 'layer2']
        >>> stages = g.split(g.resolve(["layer1", "layer2"]))
        >>> len(stages)
        3
    """

    def __init__(self, model: nn.Module, model_name: str = "model"):
        self.model = model
        self.model_name = model_name
        with eval_mode(model):
            try:
                self.graph_module = fx.symbolic_trace(model)
            except Exception as exc:  # torch.fx raises many kinds of errors
                raise SpecError(
                    f"{model_name} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                    "make its forward free of data-dependent control flow, or wrap it in nn.Sequential"
                ) from exc
        self._nodes = list(self.graph_module.graph.nodes)
        self._analyse()

    # -- analysis ---------------------------------------------------------------------------------
    def _analyse(self) -> None:
        nodes = self._nodes
        depends: dict[fx.Node, bool] = {}
        for n in nodes:
            depends[n] = n.op == "placeholder" or any(depends[a] for a in n.all_input_nodes)
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        output = nodes[-1]
        final_value = output.args[0] if isinstance(output.args[0], fx.Node) else None
        n_inputs = sum(1 for n in nodes if n.op == "placeholder")
        if n_inputs != 1:
            raise SpecError(
                f"{self.model_name}.forward takes {n_inputs} inputs; dgate needs a model of one image tensor"
            )

        live: set[fx.Node] = set()
        single: list[bool] = []
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                if last_use[a] == i:
                    live.discard(a)
            if depends[n] and n.op != "output" and last_use.get(n, -1) > i:
                live.add(n)
            single.append(live == {n} and n.op not in ("placeholder", "output") and n is not final_value)

        last_in_scope: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for path, _type in (n.meta.get("nn_module_stack") or {}).values():
                if path:
                    last_in_scope[path] = i
        by_node: dict[int, list[str]] = {}
        for path, i in last_in_scope.items():
            if single[i]:
                by_node.setdefault(i, []).append(path)
        self._depends = depends
        self._node_of_cut: dict[str, int] = {}
        self._last_in_scope = last_in_scope
        cuts = []
        for order, i in enumerate(sorted(by_node)):
            aliases = tuple(sorted(by_node[i], key=lambda p: (p.count("."), len(p), p)))
            cut = Cut(name=aliases[0], aliases=aliases, order=order)
            cuts.append(cut)
            self._node_of_cut[cut.name] = i
        self.cuts: list[Cut] = cuts
        self._by_alias = {a: c for c in cuts for a in c.aliases}
        self._final_value = final_value

    # -- queries ----------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a module name that marks a cut."""
        return name in self._by_alias

    def find(self, name: str) -> Cut:
        """Return the cut a module name refers to, or raise a :class:`SpecError` that says why not."""
        if name in self._by_alias:
            return self._by_alias[name]
        modules = dict(self.model.named_modules())
        hint = f"run `dgate stages {self.model_name} --all` to list valid gate positions"
        if name not in modules:
            close = [m for m in modules if m and (m.startswith(name) or name.startswith(m))][:3]
            near = f" (similar: {', '.join(close)})" if close else ""
            raise SpecError(f"gate position '{name}' is not a module of {self.model_name}{near}; {hint}")
        if name not in self._last_in_scope:
            raise SpecError(
                f"gate position '{name}' is a module of {self.model_name} that its forward never calls; {hint}"
            )
        if self._nodes[self._last_in_scope[name]] is self._final_value:
            raise SpecError(
                f"gate position '{name}' computes the output of {self.model_name}; gates go before the head: {hint}"
            )
        raise SpecError(
            f"gate position '{name}' is not a stage boundary of {self.model_name}: more than one tensor is alive "
            f"after it (a skip connection or concatenation crosses it); {hint}"
        )

    def resolve(self, names: Sequence[str]) -> list[Cut]:
        """Resolve gate position names to cuts in execution order; reject duplicates.

        Example:
            >>> import torchvision
            >>> g = StageGraph(torchvision.models.resnet18(), "resnet18")
            >>> [c.name for c in g.resolve(["layer1.1", "layer3"])]
            ['layer1', 'layer3']
        """
        if not names:
            raise SpecError("no gate positions given; pass --gates with at least one module name")
        cuts: dict[str, Cut] = {}
        for name in names:
            cut = self.find(name)
            if cut.name in cuts:
                raise SpecError(
                    f"gate positions '{cuts[cut.name].name}' and '{name}' are the same place in {self.model_name} "
                    f"(aliases: {', '.join(cut.aliases)}); give each position once"
                )
            cuts[cut.name] = cut
        return sorted(cuts.values(), key=lambda c: c.order)

    # -- splitting --------------------------------------------------------------------------------
    def split(self, cuts: Sequence[Cut]) -> list[fx.GraphModule]:
        """Split the model at ``cuts`` into ``len(cuts) + 1`` stages that chain to ``model(x)``.

        The stages share parameters and submodules with the model (nothing is copied).
        """
        ends = [self._node_of_cut[c.name] for c in sorted(cuts, key=lambda c: c.order)]
        stages: list[fx.GraphModule] = []
        start: int | None = None
        for k, end in enumerate([*ends, len(self._nodes) - 1]):
            stages.append(self._segment(start, end, f"Stage{k}"))
            start = end
        return stages

    def _segment(self, start: int | None, end: int, class_name: str) -> fx.GraphModule:
        nodes = self._nodes
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if start is not None:
            env[nodes[start]] = graph.placeholder("x")
            first = start + 1
        else:
            first = 0

        def copy(n: fx.Node) -> fx.Node:
            if n not in env:
                for a in n.all_input_nodes:
                    if a not in env:
                        if self._depends[a]:  # cannot happen for a valid cut
                            raise RuntimeError(f"internal error: {a} crosses the cut before {n}")
                        copy(a)
                env[n] = graph.node_copy(n, lambda a: env[a])
            return env[n]

        result: fx.Node | None = None
        for i in range(first, end + 1):
            n = nodes[i]
            if n.op == "output":
                if not isinstance(n.args[0], fx.Node):
                    raise SpecError(
                        f"{self.model_name} returns {type(n.args[0]).__name__}; dgate needs a model returning one logits tensor"
                    )
                result = copy(n.args[0])
                break
            if self._depends[n]:  # input-independent values are copied where they are used
                result = copy(n)
        assert result is not None
        graph.output(result)
        return fx.GraphModule(self.graph_module, graph, class_name=class_name)


def run_stages(stages: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``stages`` in sequence and return every stage's output (the last is the logits)."""
    outs = []
    for stage in stages:
        x = stage(x)
        outs.append(x.clone())  # a later stage may modify its input in place (ReLU(inplace=True))
    return outs
