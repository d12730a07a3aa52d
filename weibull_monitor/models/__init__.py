"""The model side: what each weight matrix is (roles), how fused parameters split (layouts), how attention stores Q
and K, and what the paper measured for each class (expectations).

Pipeline inside: ``components`` (the vocabulary: components, classes, Role) -> ``config`` (reading any config) ->
``naming`` (rules as data) -> ``roles`` (classify, model_roles) -> ``layouts`` (the fused-layout registry,
split_fused; ``layout_table`` the built-in layouts and the families the probe verified them on) and ``attention``
(attention kind); ``expectations`` holds the paper's reference bands; ``probe`` learns a model's layout from its own
forward pass (and ``learn_layouts`` turns that into layouts at run time); ``sweep`` checks every model type of the
installed transformers against it (``weibull-monitor roles --sweep``). docs/roles.md.
"""

from weibull_monitor.models import layout_table  # noqa: F401  (registers the built-in layouts)
from weibull_monitor.models.attention import attention_kind, selection_expectation_for
from weibull_monitor.models.components import COMPONENTS, KLASS_OF_COMPONENT, Role, split_key, view_role
from weibull_monitor.models.layouts import (
    FusedLayout,
    LayoutQuery,
    find_layout,
    register_layout,
    registered_layouts,
    split_fused,
)
from weibull_monitor.models.naming import display_name
from weibull_monitor.models.probe.learn import learn_layouts
from weibull_monitor.models.roles import UnknownWeightsWarning, classify, fused_components, model_roles

__all__ = [
    "COMPONENTS",
    "KLASS_OF_COMPONENT",
    "FusedLayout",
    "LayoutQuery",
    "Role",
    "UnknownWeightsWarning",
    "attention_kind",
    "classify",
    "display_name",
    "find_layout",
    "fused_components",
    "learn_layouts",
    "model_roles",
    "register_layout",
    "registered_layouts",
    "selection_expectation_for",
    "split_fused",
    "split_key",
    "view_role",
]
