"""coupled_diffusion: the statistical physics of multimodal (coupled) diffusion models in JAX."""

from ._results import RESULTS as RESULTS
from ._results import Solution as Solution
from .theory.collapse import (
    alpha_from_n as alpha_from_n,
)
from .theory.collapse import (
    collapse_time as collapse_time,
)
from .theory.collapse import (
    collapse_time_bound as collapse_time_bound,
)
from .theory.collapse import (
    mode_collapse_times as mode_collapse_times,
)
from .theory.collapse import (
    rem_cgf as rem_cgf,
)
from .theory.collapse import (
    rem_rate as rem_rate,
)
from .theory.mixture import TwoClassMixture as TwoClassMixture
from .theory.moments import mean_gram as mean_gram
from .theory.moments import moments as moments
from .theory.moments import transition as transition
from .theory.ou import CoupledOU as CoupledOU
from .theory.speciation import (
    eigenmodes as eigenmodes,
)
from .theory.speciation import (
    g_crit as g_crit,
)
from .theory.speciation import (
    kappa as kappa,
)
from .theory.speciation import (
    kappa_zero as kappa_zero,
)
from .theory.speciation import (
    mode_snrs as mode_snrs,
)
from .theory.speciation import (
    mode_speciation_times as mode_speciation_times,
)
from .theory.speciation import (
    speciation_time as speciation_time,
)
from .theory.stability import is_confining as is_confining
from .theory.stability import is_stable as is_stable
from .theory.stability import satisfies_eq60 as satisfies_eq60

__version__ = "0.1.0"
