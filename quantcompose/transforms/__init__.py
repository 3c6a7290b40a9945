"""The transform algebra: invertible linear maps on the last dimension and their composition.

See ``docs/architecture.md`` for the conventions (row vectors, ``A @ B`` applies
``A`` first, ``fold_into_weight`` / ``fold_into_output``).
"""

from quantcompose.transforms.base import Transform
from quantcompose.transforms.compose import Compose
from quantcompose.transforms.hadamard import Hadamard, fwht
from quantcompose.transforms.hadamard_fallback import (
    hadamard_like,
    hadamard_like_description,
    largest_hadamard_divisor,
)
from quantcompose.transforms.hadamard_matrices import (
    MAX_BASE_ORDER,
    base_orders,
    hadamard_bases,
    hadamard_construction,
    hadamard_matrix,
    nearest_hadamard_sizes,
    require_hadamard_size,
    supported_hadamard_size,
)
from quantcompose.transforms.identity import Identity
from quantcompose.transforms.kronecker import Kronecker, kronecker_apply, max_condition
from quantcompose.transforms.permutation import Permutation
from quantcompose.transforms.rotation import BlockDiagonal, BlockLinear, BlockRotation, random_orthogonal
from quantcompose.transforms.scale import Scale
from quantcompose.transforms.serialize import flatten_state, from_state_dict, unflatten_state

__all__ = [
    "Transform",
    "Identity",
    "Scale",
    "Permutation",
    "BlockRotation",
    "BlockLinear",
    "BlockDiagonal",
    "Hadamard",
    "Kronecker",
    "Compose",
    "kronecker_apply",
    "max_condition",
    "hadamard_matrix",
    "hadamard_bases",
    "hadamard_construction",
    "require_hadamard_size",
    "hadamard_like",
    "hadamard_like_description",
    "largest_hadamard_divisor",
    "supported_hadamard_size",
    "nearest_hadamard_sizes",
    "base_orders",
    "MAX_BASE_ORDER",
    "fwht",
    "random_orthogonal",
    "from_state_dict",
    "flatten_state",
    "unflatten_state",
]
