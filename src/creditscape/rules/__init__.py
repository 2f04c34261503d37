"""Temporal credit assignment rules (DESIGN.md §3), each registered by name."""

from creditscape.rules._base import Rule as Rule
from creditscape.rules._base import RuleState as RuleState
from creditscape.rules._base import check_network as check_network
from creditscape.rules._base import get_rule as get_rule
from creditscape.rules._base import register as register
from creditscape.rules._base import rule_class as rule_class
from creditscape.rules._base import rule_names as rule_names
from creditscape.rules._api import Alignment as Alignment
from creditscape.rules._api import expected_gradient as expected_gradient
from creditscape.rules._api import gradient_alignment as gradient_alignment
from creditscape.rules._api import rule_gradient as rule_gradient
from creditscape.rules._bptt import BPTT as BPTT
from creditscape.rules._bptt import TruncatedBPTT as TruncatedBPTT
from creditscape.rules._rtrl import RTRL as RTRL
from creditscape.rules._eprop import EProp as EProp
from creditscape.rules._eprop import RandomEProp as RandomEProp
from creditscape.rules._eprop import RFLO as RFLO
from creditscape.rules._mdgl import MDGL as MDGL
from creditscape.rules._mdgl import modulatory_weights as modulatory_weights
from creditscape.rules._modprop import ModProp as ModProp
from creditscape.rules._snap import SnAp as SnAp
from creditscape.rules._factored import UORO as UORO
from creditscape.rules._factored import KFRTRL as KFRTRL
from creditscape.rules._factored import ReverseKFRTRL as ReverseKFRTRL
from creditscape.rules._auxiliary import DNI as DNI
from creditscape.rules._auxiliary import KeRNL as KeRNL

__all__ = [
    "Rule", "RuleState", "register", "check_network", "get_rule", "rule_class", "rule_names",
    "rule_gradient", "expected_gradient", "gradient_alignment", "Alignment",
    "BPTT", "TruncatedBPTT", "RTRL", "EProp", "RandomEProp", "RFLO", "MDGL", "modulatory_weights", "ModProp", "SnAp", "UORO", "KFRTRL", "ReverseKFRTRL", "KeRNL", "DNI",
]
