"""YOSO attention kernels: fast Hadamard LSH hash, LSH cumulation, custom-VJP attention ops.

Modules (each Pallas op next to its pure-jnp ``*_reference``):
  hadamard: ``make_hash_params``, ``fast_hash`` / ``fast_hash_reference`` and the XLA path's
    ``fast_hash_xla`` (bit-identical to both).
  cumulation: ``lsh_cumulation``, ``lsh_weighted_cumulation`` (``impl='xla' | 'pallas'``) and
    their references.
  ops: ``yoso_lsh_attention``, ``yoso_expectation_attention``.

Layout everywhere: vectors ``[batch, length, dim]`` (batch = batch * heads), codes int32
``[batch, num_hash, length]``; ``ops`` also accepts any leading batch axes.
"""

from .cumulation import BlockSizes as CumulationBlockSizes
from .cumulation import (
    lsh_cumulation,
    lsh_cumulation_reference,
    lsh_weighted_cumulation,
    lsh_weighted_cumulation_reference,
)
from .hadamard import BlockSizes as HashBlockSizes
from .hadamard import (
    fast_hash,
    fast_hash_reference,
    fast_hash_xla,
    make_hash_params,
    padded_dim,
    walsh_hadamard_transform,
)
from .ops import expectation_matrix, yoso_expectation_attention, yoso_lsh_attention

__all__ = [
    "CumulationBlockSizes",
    "HashBlockSizes",
    "expectation_matrix",
    "fast_hash",
    "fast_hash_reference",
    "fast_hash_xla",
    "lsh_cumulation",
    "lsh_cumulation_reference",
    "lsh_weighted_cumulation",
    "lsh_weighted_cumulation_reference",
    "make_hash_params",
    "padded_dim",
    "walsh_hadamard_transform",
    "yoso_expectation_attention",
    "yoso_lsh_attention",
]
