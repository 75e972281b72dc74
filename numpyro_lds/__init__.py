"""numpyro_lds: LDS priors, structured Gauss–Markov guides and their exact KL for NumPyro."""

from numpyro_lds.diagnostics import pareto_k, to_inference_data
from numpyro_lds.distributions import LDSPosterior, LinearGaussianStateSpace
from numpyro_lds.guides import AutoLDSGuide
from numpyro_lds.infer import NaturalGradientSVI
from numpyro_lds.kl import KLTerms, kl_terms

__version__ = "0.1.0"

__all__ = [
    "AutoLDSGuide",
    "KLTerms",
    "LDSPosterior",
    "LinearGaussianStateSpace",
    "NaturalGradientSVI",
    "kl_terms",
    "pareto_k",
    "to_inference_data",
]
