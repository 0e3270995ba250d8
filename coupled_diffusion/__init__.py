"""coupled_diffusion: the statistical physics of multimodal (coupled) diffusion models in JAX."""

from . import _cpu_tuning

_cpu_tuning.apply()  # before anything can start JAX's CPU backend; see cpu_tuning()

from ._cpu_tuning import cpu_tuning as cpu_tuning
from ._results import RESULTS as RESULTS
from ._results import Solution as Solution
from .data.mnist import load_mnist as load_mnist
from .data.pairing import PairedMNIST as PairedMNIST
from .data.pairing import class_disjoint_permutation as class_disjoint_permutation
from .data.transforms import TRANSFORMS as TRANSFORMS
from .diffusion.noise import ModeNoise as ModeNoise
from .diffusion.noise import VPSchedule as VPSchedule
from .diffusion.noise import add_noise as add_noise
from .diffusion.noise import eps_loss as eps_loss
from .diffusion.noise import predict_x0 as predict_x0
from .diffusion.samplers import Intervention as Intervention
from .diffusion.samplers import NNXEps as NNXEps
from .diffusion.samplers import SampleResult as SampleResult
from .diffusion.samplers import ddim_step as ddim_step
from .diffusion.samplers import ddpm_step as ddpm_step
from .diffusion.samplers import sample as sample
from .diffusion.train import TrainConfig as TrainConfig
from .diffusion.train import TrainResult as TrainResult
from .diffusion.train import load_run as load_run
from .diffusion.train import train as train
from .experiments.mnist import PairClassifier as PairClassifier
from .experiments.mnist import draw_samples as draw_samples
from .experiments.mnist import evaluate_run as evaluate_run
from .experiments.mnist import fit_pair_classifier as fit_pair_classifier
from .experiments.mnist import pair_quality as pair_quality
from .experiments.mnist import sample_grid as sample_grid
from .models.dit import DIT_CONFIGS as DIT_CONFIGS
from .models.dit import DiT as DiT
from .models.pretrained import load_dit_diffusers as load_dit_diffusers
from .models.pretrained import load_dit_official as load_dit_official
from .models.pretrained import load_unet_diffusers as load_unet_diffusers
from .models.unet import UNet as UNet
from .optimize import OptimizeResult as OptimizeResult
from .optimize import alignment_objective as alignment_objective
from .optimize import gap_objective as gap_objective
from .optimize import optimize_schedule as optimize_schedule
from .optimize import schedule_mode_speciation_times as schedule_mode_speciation_times
from .optimize import speciation_objective as speciation_objective
from .optimize import speciation_with_collapse_objective as speciation_with_collapse_objective
from .sampling.brownian import GridBrownianPath as GridBrownianPath
from .sampling.brownian import TabulatedBrownianPath as TabulatedBrownianPath
from .sampling.brownian import unit_increments as unit_increments
from .sampling.cloning import CloneCurve as CloneCurve
from .sampling.cloning import MemorizationCurve as MemorizationCurve
from .sampling.cloning import ProportionCurve as ProportionCurve
from .sampling.cloning import clone_agreement as clone_agreement
from .sampling.cloning import clone_agreement_theory as clone_agreement_theory
from .sampling.cloning import memorization_curve as memorization_curve
from .sampling.cloning import wilson_interval as wilson_interval
from .sampling.draws import realise_means as realise_means
from .sampling.draws import realize_means as realize_means
from .sampling.draws import sample_data as sample_data
from .sampling.draws import sample_empirical as sample_empirical
from .sampling.draws import sample_marginal as sample_marginal
from .sampling.scores import ConditionalScore as ConditionalScore
from .sampling.scores import EmpiricalScore as EmpiricalScore
from .sampling.scores import PopulationScore as PopulationScore
from .sampling.sde import forward_sde as forward_sde
from .sampling.sde import probability_flow as probability_flow
from .sampling.sde import reverse_conditional as reverse_conditional
from .sampling.sde import reverse_sde as reverse_sde
from .sampling.trials import ConditionalTrials as ConditionalTrials
from .sampling.trials import compare_schedules as compare_schedules
from .sampling.trials import trial_metrics as trial_metrics
from .schedules import Bounded as Bounded
from .schedules import Constant as Constant
from .schedules import Early as Early
from .schedules import Late as Late
from .schedules import MonotoneSpline as MonotoneSpline
from .schedules import PiecewiseLinear as PiecewiseLinear
from .schedules import Schedule as Schedule
from .sweep import Sweep as Sweep
from .sweep import sweep as sweep
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
    rem_cgf as rem_cgf,
)
from .theory.collapse import (
    rem_rate as rem_rate,
)
from .theory.mixture import TwoClassMixture as TwoClassMixture
from .theory.modes import eigenmodes as eigenmodes
from .theory.modes import mode_collapse_times as mode_collapse_times
from .theory.modes import mode_snrs as mode_snrs
from .theory.modes import mode_speciation_times as mode_speciation_times
from .theory.moments import GridMoments as GridMoments
from .theory.moments import MomentPath as MomentPath
from .theory.moments import mean_gram as mean_gram
from .theory.moments import moments as moments
from .theory.moments import transition as transition
from .theory.ou import CoupledOU as CoupledOU
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
    speciation_time as speciation_time,
)
from .theory.stability import is_confining as is_confining
from .theory.stability import is_stable as is_stable
from .theory.stability import satisfies_eq60 as satisfies_eq60

__version__ = "0.1.0"
