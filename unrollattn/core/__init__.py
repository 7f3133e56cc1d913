"""Framework-free operators: functions over tensors and small nn.Modules, with slow references."""
from .subspace import ista_step, merge_heads, mssa, split_heads, subspace_self_attention
from .validation import check_finite, check_heads, check_tokens, set_finite_checks

__all__ = [
    "check_finite", "check_heads", "check_tokens", "ista_step", "merge_heads", "mssa",
    "set_finite_checks", "split_heads", "subspace_self_attention",
]
