"""The public API: every name that `coupled_diffusion` exported in release 0.1.0 still works, and the
names kept for backward compatibility are the same objects as their new spellings."""

import coupled_diffusion as cd

# `coupled_diffusion/__init__.py` of 0.1.0 (commit 2378e2c), before the package was reorganised
NAMES_0_1_0 = """
    Bounded CloneCurve ConditionalScore ConditionalTrials Constant CoupledOU DIT_CONFIGS DiT Early
    EmpiricalScore GridBrownianPath GridMoments Intervention Late MemorizationCurve ModeNoise MomentPath
    MonotoneSpline NNXEps OptimizeResult PairClassifier PairedMNIST PiecewiseLinear PopulationScore RESULTS
    SampleResult Schedule Solution Sweep TRANSFORMS TabulatedBrownianPath TrainConfig TrainResult
    TwoClassMixture UNet VPSchedule add_noise alignment_objective alpha_from_n class_disjoint_permutation
    clone_agreement clone_agreement_theory collapse_time collapse_time_bound compare_schedules cpu_tuning
    ddim_step ddpm_step draw_samples eigenmodes eps_loss evaluate_run fit_pair_classifier forward_sde g_crit
    gap_objective is_confining is_stable kappa kappa_zero load_dit_diffusers load_dit_official load_mnist
    load_run load_unet_diffusers mean_gram memorization_curve mode_collapse_times mode_snrs
    mode_speciation_times moments optimize_schedule pair_quality predict_x0 probability_flow realise_means
    rem_cgf rem_rate reverse_conditional reverse_sde sample sample_data sample_empirical sample_grid
    sample_marginal satisfies_eq60 schedule_mode_speciation_times speciation_objective speciation_time
    speciation_with_collapse_objective sweep train transition trial_metrics unit_increments wilson_interval
""".split()


def test_every_name_of_release_0_1_0_is_still_exported():
    missing = [n for n in NAMES_0_1_0 if not hasattr(cd, n)]
    assert not missing, missing


def test_old_spellings_are_aliases_of_the_new_names():
    from coupled_diffusion.sampling import trials

    assert cd.realise_means is cd.realize_means
    assert trials.summarise is trials.summarize
    assert cd.CloneCurve is cd.ProportionCurve and cd.MemorizationCurve is cd.ProportionCurve


def test_the_version_is_the_installed_distributions():
    from importlib.metadata import version

    assert cd.__version__ == version("coupled_diffusion")
