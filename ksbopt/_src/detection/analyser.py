"""Reading candidate symmetries off the computation graph of a loss.

:func:`analyse` takes a graph from :func:`~ksbopt._src.detection.graph.build_graph` and
runs, for every parameter leaf that enters the loss multiplicatively, a small abstract
interpretation of the group action:

- **multiplicative** (scale, rescale, linear; the rules of
  :mod:`ksbopt._src.detection.multiplicative_rules`): the leaf's units are multiplied by
  positive factors; normalisation cancels them, positively homogeneous activations keep them,
  a later linear map can absorb them (a partner), a reduction forces them to be uniform.
- A ``select_n`` whose predicate is a constant (computed from literals only, e.g. the
  ``N - ddof > 0`` guard of ``jnp.var`` / ``jnp.std``) is read as the case it picks, in both
  kinds; a predicate that depends on the inputs is never folded.
- **additive** (translation; the rules of :mod:`ksbopt._src.detection.shift_rules`): a
  kernel's rows are shifted along the unit axis. Softmax, log-softmax, logsumexp and
  mean-centring cancel it.

The result is a list of :class:`~ksbopt._src.detection.findings.Finding` (candidate groups,
with the reason they should hold, e.g. "BatchNorm epsilon=1e-05") and the leaves whose graph
could not be read (an unknown primitive, a loop), for which the caller enumerates candidates
from the parameter tree. The analysis only *proposes*: every candidate is then verified
numerically by :mod:`ksbopt._src.detection.detect`.

Group structure follows :ref:`symmetries` (Flax layout: the output unit is the last axis).
"""

from __future__ import annotations

from ksbopt._src.detection.axis_labels import initial_labels
from ksbopt._src.detection.findings import Ambiguous, Analysis, Broken, Finding, NeedUniform
from ksbopt._src.detection.graph import Graph
from ksbopt._src.detection.graph_facts import MULTIPLICATIVE_STARTS, GraphFacts
from ksbopt._src.detection.multiplicative_rules import MultiplicativeInterpreter
from ksbopt._src.detection.shift_rules import ShiftInterpreter
from ksbopt._src.detection.values import UNCERTAIN, Scaled

_MAX_RESTARTS = 16


def run_multiplicative(facts: GraphFacts, leaf: int, unit_axes):
    """(interpreter, abstract value of the loss) for the multiplicative action on ``leaf``,
    restarted with a coarser factor until no reduction needs one."""
    uniform: dict[int, set] = {}
    for _ in range(_MAX_RESTARTS):
        run = MultiplicativeInterpreter(facts, leaf, unit_axes, uniform)
        try:
            return run, run.run()
        except NeedUniform as e:
            changed = False
            for ax, s, m in e.ranges:
                if (s, m) not in uniform.setdefault(ax, set()):
                    uniform[ax].add((s, m))
                    changed = True
            if not changed:
                raise Broken("reductions over the unit axis that no factor survives") from None
    raise Ambiguous("too many coarsening restarts")


def build_reach(facts: GraphFacts, starts: dict) -> None:
    """Values that are linear images of each leaf's units (partners for q.k products)."""
    for leaf, (kind, axes) in starts.items():
        if kind not in MULTIPLICATIVE_STARTS:
            continue
        run = MultiplicativeInterpreter(facts, leaf, axes, reach=True)
        try:
            run.run()
        except (Broken, Ambiguous, NeedUniform):
            pass
        joined = {q: m for q, m in run.members.items() if q != leaf}
        for vid, val in run.env.items():
            if isinstance(val, Scaled) and val.deg == 1:
                facts.reach_index.setdefault(vid, []).append(
                    (leaf, val.labels, joined, run.snap.get(vid, frozenset()))
                )


def _norm_name(run: MultiplicativeInterpreter, free: dict) -> str:
    if run.weightnorm:
        return "weight normalisation"
    parts = list(free.values())
    if all(not f for f in parts):
        return "LayerNorm" if run.centred else "RMSNorm"
    if any(f and len(f) == 1 and f[0][0] != 1 for f in parts):
        return "GroupNorm"
    if any(not f for f in parts):
        return ("LayerNorm" if run.centred else "RMSNorm") + " per head"
    return "BatchNorm" if run.reduced_batch else "normalisation over non-unit axes"


def _eps_text(eps: list[float]) -> str:
    return ", ".join(f"epsilon={e:g}" for e in sorted(set(eps)))


def _kind_and_reason(run: MultiplicativeInterpreter, free: dict) -> tuple[str, str]:
    """The kind of a multiplicative finding and why it should hold."""
    if not run.absorbers:
        name = _norm_name(run, free) if run.cancelled else "the loss does not depend on its size"
        return "scale", (f"{name} {_eps_text(run.eps)}" if run.eps else name)
    contract = set().union(*(set(a.contract) for a in run.absorbers))
    heads = set().union(*(set(a.heads) for a in run.absorbers))
    mixable = contract - run.nonmix
    if len(mixable) == 1 and len((contract & run.nonmix) | heads) <= 1:
        kind = "linear"
        reason = "no nonlinearity between the two maps"
        if (contract & run.nonmix) | heads:
            reason += " (per head)"
    else:
        kind = "rescale"
        acts = sorted(run.acts) or ["identity"]
        reason = "positively homogeneous: " + ", ".join(acts)
    if run.eps:
        reason += f" ({_eps_text(run.eps)})"
    return kind, reason


def _multiplicative_finding(run: MultiplicativeInterpreter, leaf: int, unit_axes) -> Finding:
    shape = run.facts.graph.leaf_vars[leaf].shape
    labels0 = initial_labels(shape, set(unit_axes), run.uniform)
    free = {ax: tuple((a[1], a[2]) for a in labels0[ax] if a[3]) for ax in unit_axes}
    members = {q: dict(m) for q, m in run.members.items()}
    members[leaf] = {a: a for a in unit_axes}
    kind, reason = _kind_and_reason(run, free)
    return Finding(
        kind,
        leaf,
        tuple(unit_axes),
        members,
        free,
        list(run.absorbers),
        frozenset(run.nonmix),
        reason,
        bool(run.eps),
    )


def _translation_finding(run: ShiftInterpreter, leaf: int, axis: int, out) -> Finding:
    if run.softmax:
        reason = "softmax over the class axis"
    elif run.centring:
        reason = "mean-centring normalisation"
    else:
        reason = "the graph suggests the shift cancels"
    members = {q: dict(m) for q, m in run.members.items() if q != leaf}
    members[leaf] = {axis: axis}
    size = run.facts.graph.leaf_vars[leaf].shape[axis]
    return Finding(
        "translation",
        leaf,
        (axis,),
        members,
        {axis: ((1, size),)},
        [],
        frozenset(),
        reason,
        False,
        certain=out is None,
    )


def _analyse_multiplicative(facts: GraphFacts, leaf: int, axes, result: Analysis) -> None:
    try:
        run, out = run_multiplicative(facts, leaf, axes)
        if out is None:
            result.findings.append(_multiplicative_finding(run, leaf, axes))
        else:
            result.broken[(leaf, "mult")] = "the loss changes with the unit's size"
    except Broken as e:
        result.broken[(leaf, "mult")] = str(e)
    except Ambiguous as e:
        result.ambiguous[leaf] = f"cannot follow its units through {e}"


def _analyse_shift(facts: GraphFacts, leaf: int, axis: int, result: Analysis) -> None:
    try:
        run = ShiftInterpreter(facts, leaf, axis)
        out = run.run()
    except Broken as e:
        result.broken[(leaf, f"shift{axis}")] = str(e)
        return
    except Ambiguous as e:
        result.ambiguous.setdefault(leaf, f"cannot follow a shift through {e}")
        return
    if out is None or out is UNCERTAIN:
        result.findings.append(_translation_finding(run, leaf, axis, out))
    else:
        result.broken[(leaf, f"shift{axis}")] = "the loss changes with the shift"


def analyse(graph: Graph) -> Analysis:
    """Candidate symmetries of every leaf of ``graph`` (see the module docstring)."""
    facts = GraphFacts(graph)
    starts = {i: facts.start(i) for i in range(len(graph.leaf_vars))}
    result = Analysis([], {}, {}, [], starts)
    if graph.opaque:
        result.notes.append(
            "the loss contains " + ", ".join(graph.opaque) + "; leaves used inside "
            "them are enumerated from the parameter tree"
        )
    build_reach(facts, starts)
    for leaf, (kind, axes) in starts.items():
        if kind == "ambiguous":
            result.ambiguous[leaf] = f"enters the loss through {axes}"
            continue
        if kind not in MULTIPLICATIVE_STARTS:
            continue
        _analyse_multiplicative(facts, leaf, axes, result)
        if kind in ("dot", "conv"):
            for axis in sorted(axes):
                _analyse_shift(facts, leaf, axis, result)
    return result
