"""jaxtyping aliases shared across the package."""

from jaxtyping import Array, ArrayLike, Bool, Float, Int

Scalar = Float[Array, ""]
ScalarLike = float | Float[ArrayLike, ""]
KxK = Float[Array, "k k"]
KVec = Float[Array, " k"]
BoolScalar = Bool[Array, ""]
IntScalar = Int[Array, ""]

__all__ = ["Array", "ArrayLike", "BoolScalar", "IntScalar", "KVec", "KxK", "Scalar", "ScalarLike"]
