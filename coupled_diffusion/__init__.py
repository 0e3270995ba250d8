"""coupled_diffusion: the statistical physics of multimodal (coupled) diffusion models in JAX.

The public API is what this file re-exports, grouped by layer (README, "Layout"). Importing
the package changes nothing in the host process; the CPU tuning is opt-in (`tune_cpu`).
"""

from . import _cpu_tuning

_cpu_tuning.tune_at_import()  # only with COUPLED_DIFFUSION_CPU_TUNING=1, before anything can start JAX's backend

# 0. foundations: version, result codes, host tuning, the errors of damaged or busy run directories
from ._checkpoint import CorruptCheckpointError as CorruptCheckpointError
from ._cpu_tuning import cpu_tuning as cpu_tuning, tune_cpu as tune_cpu
from ._results import RESULTS as RESULTS, Solution as Solution
from ._runlock import RunLock as RunLock, RunLockedError as RunLockedError
from ._version import __version__ as __version__

# 1. closed-form theory of k coupled OU processes, and coupling schedules
from .theory.collapse import (
    alpha_from_n as alpha_from_n,
    collapse_time as collapse_time,
    collapse_time_bound as collapse_time_bound,
    rem_cgf as rem_cgf,
    rem_rate as rem_rate,
)
from .theory.graphs import (
    GRAPHS as GRAPHS,
    adjacency as adjacency,
    adjacency_eigenvalues as adjacency_eigenvalues,
    coupling_matrix as coupling_matrix,
    stability_interval as stability_interval,
)
from .theory.mixture import TwoClassMixture as TwoClassMixture
from .theory.modes import (
    ModeHierarchy as ModeHierarchy,
    eigenmodes as eigenmodes,
    mode_basis as mode_basis,
    mode_collapse_times as mode_collapse_times,
    mode_hierarchy as mode_hierarchy,
    mode_snrs as mode_snrs,
    mode_speciation_times as mode_speciation_times,
)
from .theory.moments import (
    GridMoments as GridMoments,
    MomentPath as MomentPath,
    mean_gram as mean_gram,
    moments as moments,
    transition as transition,
)
from .theory.ou import CoupledOU as CoupledOU
from .theory.speciation import g_crit as g_crit, kappa as kappa, kappa_zero as kappa_zero, speciation_time as speciation_time
from .theory.stability import is_confining as is_confining, is_stable as is_stable, satisfies_eq60 as satisfies_eq60
from .schedules import (  # isort: skip (layer order)
    Bounded as Bounded,
    Constant as Constant,
    Early as Early,
    Late as Late,
    MonotoneSpline as MonotoneSpline,
    PiecewiseLinear as PiecewiseLinear,
    Schedule as Schedule,
)

# 2. exact-score sampling
from .sampling.brownian import (
    GridBrownianPath as GridBrownianPath,
    TabulatedBrownianPath as TabulatedBrownianPath,
    unit_increments as unit_increments,
)
from .sampling.cloning import (
    CloneCurve as CloneCurve,
    MemorizationCurve as MemorizationCurve,
    ProportionCurve as ProportionCurve,
    clone_agreement as clone_agreement,
    clone_agreement_theory as clone_agreement_theory,
    mode_clone_agreement_theory as mode_clone_agreement_theory,
    memorization_curve as memorization_curve,
    wilson_interval as wilson_interval,
)
from .sampling.draws import (
    realise_means as realise_means,
    realize_means as realize_means,
    sample_data as sample_data,
    sample_empirical as sample_empirical,
    sample_marginal as sample_marginal,
)
from .sampling.criticality import (
    CorrelationLength as CorrelationLength,
    GinzburgLandauFit as GinzburgLandauFit,
    ModeRates as ModeRates,
    correlation_function as correlation_function,
    correlation_length as correlation_length,
    critical_time as critical_time,
    fourier_modes as fourier_modes,
    ginzburg_landau_fit as ginzburg_landau_fit,
    mode_growth_rates as mode_growth_rates,
    reverse_drift as reverse_drift,
    structure_factor as structure_factor,
)
from .sampling.patch import GaussianPatchScore as GaussianPatchScore, PatchScore as PatchScore, patch_indices as patch_indices
from .sampling.scores import ConditionalScore as ConditionalScore, EmpiricalScore as EmpiricalScore, PopulationScore as PopulationScore
from .sampling.sde import (
    forward_sde as forward_sde,
    probability_flow as probability_flow,
    reverse_conditional as reverse_conditional,
    reverse_sde as reverse_sde,
)
from .sampling.trials import ConditionalTrials as ConditionalTrials, compare_schedules as compare_schedules, trial_metrics as trial_metrics

# 3. neural score models
from .models.dit import DIT_CONFIGS as DIT_CONFIGS, DiT as DiT
from .models.pretrained import (
    load_dit_diffusers as load_dit_diffusers,
    load_dit_official as load_dit_official,
    load_unet_diffusers as load_unet_diffusers,
)
from .models.unet import UNet as UNet
from .models.replica import coupled_dit as coupled_dit, replica_attention as replica_attention, replica_init as replica_init
from .models.resnet import (
    ResNet50 as ResNet50,
    imagenet_normalize as imagenet_normalize,
    load_resnet50 as load_resnet50,
    resnet50_from_state_dict as resnet50_from_state_dict,
)
from .models.vae import (
    VAEDecoder as VAEDecoder,
    load_vae_decoder as load_vae_decoder,
    vae_decoder_from_diffusers as vae_decoder_from_diffusers,
)

# 4. data, discrete VP diffusion and training
from .data.mnist import load_mnist as load_mnist
from .data.pairing import PairedMNIST as PairedMNIST, class_disjoint_permutation as class_disjoint_permutation
from .data.transforms import TRANSFORMS as TRANSFORMS
from .diffusion.checkpoint import TrainResult as TrainResult, load_run as load_run
from .diffusion.config import (
    DataConfig as DataConfig,
    LogConfig as LogConfig,
    ModelConfig as ModelConfig,
    NoiseConfig as NoiseConfig,
    OptimizerConfig as OptimizerConfig,
    RunConfig as RunConfig,
    TrainConfig as TrainConfig,
)
from .diffusion.exact import EmpiricalEps as EmpiricalEps, GaussianMixtureEps as GaussianMixtureEps, VPScore as VPScore
from .diffusion.noise import (
    ModeNoise as ModeNoise,
    VPSchedule as VPSchedule,
    add_noise as add_noise,
    eps_loss as eps_loss,
    predict_x0 as predict_x0,
)
from .diffusion.samplers import (
    GuidedEps as GuidedEps,
    Intervention as Intervention,
    NNXEps as NNXEps,
    SampleResult as SampleResult,
    ddim_step as ddim_step,
    ddpm_step as ddpm_step,
    guidance_strength as guidance_strength,
    guidance_weights as guidance_weights,
    matched_constant_scale as matched_constant_scale,
    ou_times as ou_times,
    sample as sample,
)
from .diffusion.replica_sync import (
    DiTPairEps as DiTPairEps,
    DifferenceModes as DifferenceModes,
    block_modes as block_modes,
    hidden_differences as hidden_differences,
    mode_energy_trajectory as mode_energy_trajectory,
    SigmoidFit as SigmoidFit,
    band_gap_ratio as band_gap_ratio,
    coarse_fine_similarity as coarse_fine_similarity,
    difference_modes as difference_modes,
    dit_pair_eps as dit_pair_eps,
    fit_sigmoid as fit_sigmoid,
    mode_energies as mode_energies,
    sample_replicas as sample_replicas,
    scale_split as scale_split,
)
from .diffusion.sync import (
    Crossing as Crossing,
    agreement as agreement,
    cosine_to_final as cosine_to_final,
    crossing_time as crossing_time,
    excess_agreement as excess_agreement,
    ghosting_index as ghosting_index,
    speciation_crossing as speciation_crossing,
    sync_gaps as sync_gaps,
)
from .diffusion.train import train as train

# 5. schedule optimisation and parameter sweeps
from .optimize import (
    OptimizeResult as OptimizeResult,
    alignment_objective as alignment_objective,
    gap_objective as gap_objective,
    optimize_schedule as optimize_schedule,
    schedule_mode_speciation_times as schedule_mode_speciation_times,
    speciation_objective as speciation_objective,
    speciation_with_collapse_objective as speciation_with_collapse_objective,
)
from .sweep import Sweep as Sweep, sweep as sweep

# 6. the papers' experiments
from .experiments.mnist import (
    PairClassifier as PairClassifier,
    draw_samples as draw_samples,
    evaluate_run as evaluate_run,
    fit_pair_classifier as fit_pair_classifier,
    pair_quality as pair_quality,
    sample_grid as sample_grid,
)
from .experiments.mnist_sync import (
    ModeClassifier as ModeClassifier,
    classify_modes as classify_modes,
    fit_mode_classifiers as fit_mode_classifiers,
    intervention_curve as intervention_curve,
    intervention_effect as intervention_effect,
    mode_images as mode_images,
    protocol1 as protocol1,
    protocol2 as protocol2,
    run_eps as run_eps,
)
from .experiments.sync_sweep import SyncSweep as SyncSweep, run_sync_sweep as run_sync_sweep, summarize_sweep as summarize_sweep
