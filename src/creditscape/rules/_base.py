"""The learning-rule interface and its registry.

A rule maps (parameters, batch, rule state) to (loss, gradient estimate ĝ). The readout W_out,
b_out always receives its exact gradient; rules differ in what they keep of the recurrent Jacobian
J_t = D_t + R_t and in which feedback carries the output error (DESIGN.md §3).

Every rule is a frozen dataclass (hashable, so it can be a static argument of ``jax.jit``) whose
fields are its options. A rule computes its estimate in one or both **forms**:

* ``"offline"``: autodiff through a modified graph, memory growing with T;
* ``"online"``: a forward-in-time recursion whose memory does not grow with T.

A **stochastic** rule (``stochastic = True``: UORO, KF-RTRL, ...) draws random numbers inside each
estimate from the ``key`` it is given; an exact gradient is then the estimate's expectation over
keys, not one draw. Only stochastic rules receive a key.

A **per-sequence** rule (``per_sequence = True``) forms ĝ as the batch mean of every sequence's own
estimate; training may then split one member's minibatch over several devices.

Adding a rule: subclass :class:`Rule`, implement :meth:`Rule.gradient`, set ``name``, ``formula``
and ``forms``, and decorate with :func:`register`. The shared test matrix then covers it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax

from creditscape.model import ModelConfig, Params, Structure
from creditscape.objective import Batch, Noise

RuleState = Any  # a pytree (``()`` for rules without state)

_REGISTRY: dict[str, type["Rule"]] = {}


@dataclasses.dataclass(frozen=True)
class Rule(abc.ABC):
    """Base class of learning rules. Subclasses are frozen dataclasses of their options."""

    name: ClassVar[str]
    formula: ClassVar[str]  # one line, shown by ``creditscape rules``
    forms: ClassVar[tuple[str, ...]]  # supported forms; the first is the default
    stochastic: ClassVar[bool] = False  # draws random numbers from ``key`` in each estimate
    learns: ClassVar[bool] = False  # its state holds auxiliary parameters updated by :meth:`learn`
    spiking: ClassVar[bool] = False  # defined on spiking networks (model forms "lif" and "alif")
    # ĝ and the loss are the batch means of each sequence's own estimate and loss, so a minibatch
    # may be split over devices and the parts' means averaged (tested for every rule that says so).
    # False unless a rule declares it: one that uses batch statistics (ModProp's μ) is not.
    per_sequence: ClassVar[bool] = False

    def init(self, cfg: ModelConfig, params: Params, struct: Structure, *, key: jax.Array) -> RuleState:
        """Draw the rule's fixed state (e.g. random feedback); ``()`` when it has none."""
        del cfg, params, struct, key
        return ()

    @abc.abstractmethod
    def gradient(
        self,
        cfg: ModelConfig,
        params: Params,
        struct: Structure,
        state: RuleState,
        batch: Batch,
        noise: Noise,
        *,
        form: str,
    ) -> tuple[jax.Array, Params]:
        """Return (exact loss of the batch, gradient estimate ĝ with the structure of ``params``).
        A stochastic rule's ``gradient`` also takes a keyword ``key``, a PRNG key for its draws;
        call rules through :func:`creditscape.rules.rule_gradient`, which passes it where needed."""

    def learn(
        self,
        cfg: ModelConfig,
        params: Params,
        struct: Structure,
        state: RuleState,
        batch: Batch,
        noise: Noise,
        *,
        key: jax.Array,
    ) -> RuleState:
        """The rule's state after one update of its auxiliary parameters on this batch (rules with
        ``learns = True``, e.g. KeRNL's and DNI's predictors; the others keep their state). The
        trainer calls it every iteration of a learning rule, after :meth:`gradient`, at the same
        parameters; the state is saved and resumed with the network."""
        del cfg, params, struct, batch, noise, key
        return state

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse, with a ``ValueError`` that says what to change, a network on which this rule
        would not compute what its name promises (checked before any work)."""
        del cfg

    def computation(self, cfg: ModelConfig) -> tuple:
        """What this rule computes on networks like ``cfg``, as a hashable key. Two rules with
        equal keys give the same ĝ (up to rounding) and train the same networks from the same
        seed, so a comparison counts them once. The form never enters the key (online ==
        offline); subclasses map themselves onto the rule they equal."""
        del cfg
        return (self.name, *dataclasses.astuple(self))

    def check_form(self, form: str | None) -> str:
        """Resolve ``None`` to the default form; refuse a form this rule does not have."""
        if form is None:
            return self.forms[0]
        if form not in self.forms:
            raise ValueError(
                f"Rule {self.name!r} has no {form!r} form; it has {self.forms}. "
                f"Set form to one of these (or leave it unset for {self.forms[0]!r})."
            )
        return form


def check_network(rule: Rule, cfg: ModelConfig) -> None:
    """Refuse a network ``rule`` is not defined on: a spiking one for a rule without a spiking
    form, then whatever the rule's own :meth:`Rule.check_model` refuses."""
    if cfg.spiking and not rule.spiking:
        names = ", ".join(n for n, c in _REGISTRY.items() if c.spiking)
        raise ValueError(f"Rule {rule.name!r} is not built for spiking networks (model.form = {cfg.form!r}); "
                         f"the rules for them are: {names}.")
    rule.check_model(cfg)


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make a rule available by its ``name`` (in Python, configs and the CLI)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"A rule named {cls.name!r} is already registered ({_REGISTRY[cls.name]}).")
    _REGISTRY[cls.name] = cls
    return cls


def rule_names() -> list[str]:
    """Names of all registered rules, in registration order."""
    return list(_REGISTRY)


def rule_class(name: str) -> type[Rule]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown rule {name!r}. Known rules: {', '.join(_REGISTRY)} "
            "(`creditscape rules` lists them with their formulas)."
        ) from None


def get_rule(name: str, **options) -> Rule:
    """Build the rule registered as ``name`` with its options (e.g. ``get_rule("tbptt", k=5)``)."""
    cls = rule_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(
            f"Rule {name!r} has no option(s) {sorted(unknown)}; its options are {sorted(fields) or 'none'}."
        )
    return cls(**options)
