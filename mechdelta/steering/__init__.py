"""Steering validation: mean-difference vectors between the two models, added to the reference
and subtracted from the intervened model, with a random-direction control."""

from mechdelta.steering.result import SteeringResult
from mechdelta.steering.steer import DEFAULT_ALPHAS, InSampleSteeringWarning, steer
from mechdelta.steering.vectors import SteeringVectors, steering_vectors

__all__ = [
    "DEFAULT_ALPHAS",
    "InSampleSteeringWarning",
    "SteeringResult",
    "SteeringVectors",
    "steer",
    "steering_vectors",
]
