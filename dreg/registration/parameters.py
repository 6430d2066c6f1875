"""Elastix parameter overrides checked in pure Python, as elastix would read them.

A value elastix cannot use either fails every block of a stage (a run that ends with
nothing registered), crashes the worker process (a negative B-spline grid spacing, a
groupwise metric on a 3D image), or is silently taken to mean something else (a count
of schedule values that does not match the number of resolutions). So every override
of a parameter elastix documents is checked here, while planning, before any cluster
starts: its type, its range and its number of values; component names against the
components elastix has, and that this pipeline can feed.

Names not listed here pass on to the check on a worker (`elastix.check_parameter_map`),
which runs elastix briefly and refuses a parameter that elastix reports unused.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dreg.errors import InputError

DEFAULT_RESOLUTIONS = 2  # the presets' NumberOfResolutions (see elastix.parameter_map)
AXES = 3

# Components of the elastix in itk-elastix that register a 3D pair of images as this
# pipeline gives them (each one tried on a small pair).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "Registration": ("MultiResolutionRegistration", "MultiMetricMultiResolutionRegistration"),
    "Metric": ("AdvancedMattesMutualInformation", "AdvancedMeanSquares",
               "AdvancedNormalizedCorrelation", "AdvancedKappaStatistic",
               "NormalizedMutualInformation", "SumSquaredTissueVolumeDifference",
               "TransformBendingEnergyPenalty", "TransformRigidityPenalty",
               "DisplacementMagnitudePenalty"),
    "Optimizer": ("AdaptiveStochasticGradientDescent", "PreconditionedStochasticGradientDescent",
                  "StandardGradientDescent", "RegularStepGradientDescent", "QuasiNewtonLBFGS",
                  "ConjugateGradient", "ConjugateGradientFRPR", "FiniteDifferenceGradientDescent",
                  "RSGDEachParameterApart", "CMAEvolutionStrategy", "Simplex", "Powell",
                  "SimultaneousPerturbation", "FullSearch"),
    "Transform": ("TranslationTransform", "EulerTransform", "SimilarityTransform",
                  "AffineTransform", "AffineDTITransform", "AffineLogTransform",
                  "BSplineTransform", "RecursiveBSplineTransform"),
    "Interpolator": ("LinearInterpolator", "NearestNeighborInterpolator", "BSplineInterpolator",
                     "BSplineInterpolatorFloat", "ReducedDimensionBSplineInterpolator"),
    "ResampleInterpolator": ("FinalLinearInterpolator", "FinalNearestNeighborInterpolator",
                             "FinalBSplineInterpolator", "FinalBSplineInterpolatorFloat",
                             "FinalReducedDimensionBSplineInterpolator"),
    "Resampler": ("DefaultResampler",),
    "ImageSampler": ("RandomCoordinate", "Random", "Full", "Grid", "MultiInputRandomCoordinate"),
    "FixedImagePyramid": ("FixedSmoothingImagePyramid", "FixedRecursiveImagePyramid",
                          "FixedShrinkingImagePyramid", "FixedGenericImagePyramid"),
    "MovingImagePyramid": ("MovingSmoothingImagePyramid", "MovingRecursiveImagePyramid",
                           "MovingShrinkingImagePyramid", "MovingGenericImagePyramid"),
}
# Components elastix has that need what this pipeline never gives elastix (several
# crash the process on a 3D pair).
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("PCAMetric", "PCAMetric2", "SumOfPairwiseCorrelationCoefficientsMetric",
                     "VarianceOverLastDimensionMetric", "AffineLogStackTransform",
                     "BSplineStackTransform", "EulerStackTransform",
                     "TranslationStackTransform"), "a 4D stack of images (groupwise)"),
    **dict.fromkeys(("GradientDifference", "NormalizedGradientCorrelation", "PatternIntensity",
                     "RayCastInterpolator", "FinalRayCastInterpolator"),
                    "a 2D-3D (projection) registration"),
    **dict.fromkeys(("CorrespondingPointsEuclideanDistanceMetric", "MissingStructurePenalty",
                     "PolydataDummyPenalty", "StatisticalShapePenalty"), "point sets or meshes"),
    **dict.fromkeys(("DistancePreservingRigidityPenalty", "ExternalTransform",
                     "DeformationFieldTransform", "SplineKernelTransform",
                     "WeightedCombinationTransform", "MultiBSplineTransformWithNormal"),
                    "extra input files"),
    "RandomSparseMask": "a mask",
    "MultiResolutionRegistrationWithFeatures": "feature images",
    "OpenCLResampler": "OpenCL",
}


@dataclass(frozen=True)
class Rule:
    """How elastix reads one parameter: each value's kind and range, and how many values.

    `count` is "one"; "resolution" (one value, or one per resolution); "schedule" (one
    per axis per resolution); "grid" (one per resolution, or one per axis per
    resolution); "axis" (one, or one per axis); "metric" (one, or one per metric);
    "some" (at least one)."""

    kind: str  # "int", "number", "bool", "choice", "component", "text"
    low: float | None = None
    high: float | None = None
    above: bool = False  # strictly greater than `low`
    cap: float | None = None  # a sanity bound: beyond it a value costs days or memory
    count: str = "one"
    choices: tuple[str, ...] = ()


def _rules(names: str, rule: Rule) -> dict[str, Rule]:
    return dict.fromkeys(names.split(), rule)


MAX_RESOLUTIONS = 10
MAX_ITERATIONS = 100_000
MAX_SAMPLES = 2**24  # the voxels of the largest block (256^3)
MAX_HISTOGRAM_BINS = 4096
MAX_THREADS = 1024
PIXEL_TYPES = ("char", "unsigned char", "short", "unsigned short", "int", "unsigned int",
               "long", "unsigned long", "float", "double")
RULES: dict[str, Rule] = {
    **{name: Rule("component", count=count) for name, count in (
        ("Registration", "one"), ("Metric", "some"), ("Optimizer", "one"),
        ("Transform", "one"), ("Interpolator", "metric"), ("ResampleInterpolator", "one"),
        ("Resampler", "one"), ("ImageSampler", "metric"), ("FixedImagePyramid", "one"),
        ("MovingImagePyramid", "one"))},
    # Upper bounds on counts: a value past them runs for days or exhausts memory on a
    # block of at most 256^3 voxels (MaximumNumberOfIterations: 1000000000), never better.
    "NumberOfResolutions": Rule("int", low=1, cap=MAX_RESOLUTIONS),
    "MaximumNumberOfIterations": Rule("int", low=1, cap=MAX_ITERATIONS, count="resolution"),
    **_rules("NumberOfSpatialSamples NumberOfSamplesForExactGradient",
             Rule("int", low=1, cap=MAX_SAMPLES, count="resolution")),
    **_rules("NumberOfHistogramBins NumberOfFixedHistogramBins NumberOfMovingHistogramBins",
             Rule("int", low=1, cap=MAX_HISTOGRAM_BINS, count="resolution")),
    "MaxBandCovSize": Rule("int", low=1, count="resolution"),
    **_rules("MaximumNumberOfSamplingAttempts NumberOfJacobianMeasurements "
             "NumberOfGradientMeasurements NumberOfBandStructureSamples",
             Rule("int", low=0, count="resolution")),
    **_rules("FixedKernelBSplineOrder MovingKernelBSplineOrder",
             Rule("int", low=0, high=3, count="resolution")),
    **_rules("BSplineInterpolationOrder FixedImageBSplineInterpolationOrder",
             Rule("int", low=0, high=5, count="resolution")),
    "FinalBSplineInterpolationOrder": Rule("int", low=0, high=5),
    "BSplineTransformSplineOrder": Rule("int", low=1, high=3),
    "MaximumNumberOfThreads": Rule("int", low=1, cap=MAX_THREADS),
    "PassiveEdgeWidth": Rule("int", low=0),
    **_rules("SP_a SP_A SP_alpha MaximumStepLength MinimumStepLength StepLength "
             "SigmoidScaleFactor", Rule("number", low=0, above=True, count="resolution")),
    "MaximumStepLengthRatio": Rule("number", low=0, above=True),
    "RelaxationFactor": Rule("number", low=0, high=1, above=True, count="resolution"),
    **_rules("MinimumGradientMagnitude GradientMagnitudeTolerance ValueTolerance "
             "SigmoidInitialTime FixedLimitRangeRatio MovingLimitRangeRatio",
             Rule("number", low=0, count="resolution")),
    **_rules("SigmoidMax SigmoidMin SigmoidScale", Rule("number", count="resolution")),
    "DefaultPixelValue": Rule("number"),
    **_rules(" ".join(f"{side}ImagePyramid{what}Schedule" for side in ("", "Fixed", "Moving")
                      for what in ("", "Rescale", "Smoothing")),
             Rule("number", low=0, count="schedule")),
    "GridSpacingSchedule": Rule("number", low=0, above=True, count="grid"),
    **_rules("FinalGridSpacingInVoxels FinalGridSpacingInPhysicalUnits",
             Rule("number", low=0, above=True, count="axis")),
    **_rules("AutomaticParameterEstimation AutomaticScalesEstimation "
             "AutomaticTransformInitialization CheckNumberOfSamples NewSamplesEveryIteration "
             "WriteResultImage WriteIterationInfo WriteTransformParametersEachIteration "
             "WriteTransformParametersEachResolution WriteResultImageAfterEachResolution "
             "WritePyramidImagesAfterEachResolution ShowExactMetricValue UseDirectionCosines "
             "UseFastAndLowMemoryVersion UseJacobianPreconditioning FiniteDifferenceDerivative "
             "UseMultiThreadingForMetrics UseRandomSampleRegion UseAdaptiveStepSizes "
             "UseConstantStep UseCyclicTransform UseRelativeWeights ErodeMask ErodeFixedMask "
             "ErodeMovingMask UseNormalization UseComposition "
             "UseBinaryFormatForTransformationParameters CompressResultImage",
             Rule("bool", count="resolution")),
    **_rules("ResultImagePixelType FixedInternalImagePixelType MovingInternalImagePixelType",
             Rule("choice", choices=PIXEL_TYPES)),
    "AutomaticTransformInitializationMethod": Rule(
        "choice", choices=("GeometricalCenter", "CenterOfGravity", "Origins", "GeometricTop")),
    "ASGDParameterEstimationMethod": Rule("choice", count="resolution",
                                          choices=("Original", "DisplacementDistribution")),
    "HowToCombineTransforms": Rule("choice", choices=("Compose", "Add")),
    "ResultImageFormat": Rule("text"),
}
METRIC_INDEXED = re.compile(r"^Metric(\d+)(Weight|Use|RelativeWeight)$")
INDEXED_RULES = {"Weight": Rule("number", low=0, count="resolution"),
                 "RelativeWeight": Rule("number", low=0, count="resolution"),
                 "Use": Rule("bool", count="resolution")}
INTEGER = re.compile(r"^[+-]?\d+$")
# difflib's similarity from which an unknown name is taken for a misspelt known one: one
# letter off in a long name is 0.95 or more; two distinct names here are at most 0.921.
SPELLING_CUTOFF = 0.93


def is_known(name: str) -> bool:
    """Whether `name` is a parameter elastix documents (and this module checks)."""
    return name in RULES or bool(METRIC_INDEXED.match(name))


def as_values(value: Any) -> list[str]:
    """A parameter's values as elastix receives them (see elastix.parameter_map)."""
    values = value if isinstance(value, list | tuple) else [value]
    return ["true" if v is True else "false" if v is False else str(v) for v in values]


def _number_text(rule: Rule) -> str:
    noun = "whole number" if rule.kind == "int" else "number"
    if rule.low is not None and rule.high is not None:
        return f"a {noun} from {rule.low:g}{' (excluded)' if rule.above else ''} to {rule.high:g}"
    if rule.low == 0 and rule.kind == "int":
        return "a non-negative whole number"
    if rule.low == 0:
        return "a positive number" if rule.above else "a non-negative number"
    if rule.low == 1 and rule.kind == "int":
        return "a positive whole number"
    return f"a {noun}"


def _value_problem(rule: Rule, text: str, category: str) -> str | None:
    """Why elastix cannot use `text` as one value under `rule`, or None."""
    stripped = text.strip()
    if rule.kind == "bool":
        return None if stripped in ("true", "false") else "must be true or false"
    if rule.kind == "choice":
        return None if stripped in rule.choices else f"must be one of {', '.join(rule.choices)}"
    if rule.kind == "component":
        return _component_problem(category, stripped)
    if rule.kind == "text":
        return None
    if rule.kind == "int" and not INTEGER.match(stripped):
        return f"must be {_number_text(rule)}"
    try:
        number = float(stripped)
    except ValueError:
        return f"must be {_number_text(rule)}"
    if not math.isfinite(number):
        return f"must be {_number_text(rule)}"
    too_low = rule.low is not None and (number <= rule.low if rule.above else number < rule.low)
    too_high = rule.high is not None and number > rule.high
    if too_low or too_high:
        return f"must be {_number_text(rule)}"
    if rule.cap is not None and number > rule.cap:
        return f"must be at most {rule.cap:g} (more would run for days or exhaust memory)"
    return None


def _component_problem(category: str, name: str) -> str | None:
    usable = COMPONENTS[category]
    if name in usable:
        return None
    if name in UNSUPPORTED:
        return f"needs {UNSUPPORTED[name]}, which dreg does not give elastix"
    close = difflib.get_close_matches(name, usable, n=1)
    hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(usable)}"
    return f"is not an elastix {category} component; {hint}"


def _expected_counts(rule: Rule, resolutions: int, metrics: int) -> tuple[set[int], str]:
    """The numbers of values elastix accepts, and how to say so."""
    if rule.count == "resolution":
        return {1, resolutions}, f"1 value, or 1 per resolution ({resolutions})"
    if rule.count == "schedule":
        return ({AXES * resolutions},
                f"3 × NumberOfResolutions = {AXES * resolutions} values (one per axis per "
                "resolution)")
    if rule.count == "grid":
        return ({resolutions, AXES * resolutions},
                f"{resolutions} values (one per resolution) or {AXES * resolutions} (one per "
                "axis per resolution)")
    if rule.count == "axis":
        return {1, AXES}, "1 value, or 3 (one per axis)"
    if rule.count == "metric":
        return {1, metrics}, f"1 value, or 1 per metric ({metrics})"
    return {1}, "1 value"


def _resolutions(overrides: Mapping[str, Any]) -> int:
    values = as_values(overrides.get("NumberOfResolutions", DEFAULT_RESOLUTIONS))
    return int(values[0]) if len(values) == 1 and INTEGER.match(values[0].strip()) else 1


def check_parameters(preset: str, overrides: Mapping[str, Any], stage: str) -> None:
    """Refuse, naming the parameter, any override elastix would reject, crash on, or read
    differently from what it says. `preset` is the stage's transform preset."""
    resolutions = _resolutions(overrides)
    # Every preset's map has one metric (elastix.parameter_map).
    metrics = len(as_values(overrides["Metric"])) if "Metric" in overrides else 1
    # NumberOfResolutions first: the counts of the others depend on it.
    for name in sorted(overrides, key=lambda n: n != "NumberOfResolutions"):
        values = as_values(overrides[name])
        indexed = METRIC_INDEXED.match(name)
        rule = INDEXED_RULES[indexed.group(2)] if indexed else RULES.get(name)
        if rule is None:
            _check_spelling(name, stage)
            continue  # for the check on a worker (elastix reports unused parameters)
        where = f"stage {stage}: parameter {name}"
        if indexed and int(indexed.group(1)) >= metrics:
            raise InputError(f"{where} refers to metric {indexed.group(1)}, but Metric has "
                             f"{metrics} (numbered from 0)")
        if not values:
            raise InputError(f"{where} has no value")
        for text in values:
            problem = _value_problem(rule, text, name)
            if problem and rule.kind == "component":
                raise InputError(f"{where}: {text!r} {problem}")
            if problem:
                raise InputError(f"{where} {problem}, got {text!r}")
        if rule.count == "some":
            continue
        counts, wanted = _expected_counts(rule, resolutions, metrics)
        if len(values) not in counts:
            raise InputError(f"{where} needs {wanted}, got {len(values)}: {values}")
    _check_registration(preset, overrides, metrics, stage)


def _check_spelling(name: str, stage: str) -> None:
    """An unknown name one slip away from a known one (elastix would ignore it)."""
    by_lower = {known.lower(): known for known in RULES}
    close = ([by_lower[name.lower()]] if name.lower() in by_lower
             else difflib.get_close_matches(name, RULES, n=1, cutoff=SPELLING_CUTOFF))
    if close:
        raise InputError(f"stage {stage}: parameter {name} is not an elastix parameter "
                         f"(elastix would ignore it); did you mean {close[0]}?")


def _check_registration(preset: str, overrides: Mapping[str, Any], metrics: int,
                        stage: str) -> None:
    registration = as_values(overrides.get("Registration", (
        "MultiMetricMultiResolutionRegistration" if preset == "bspline"
        else "MultiResolutionRegistration")))[0]
    if metrics > 1 and registration == "MultiResolutionRegistration":
        raise InputError(
            f"stage {stage}: parameter Registration MultiResolutionRegistration uses one "
            f"metric, but Metric has {metrics}; use MultiMetricMultiResolutionRegistration")
