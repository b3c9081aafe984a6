from .backbones import BackboneError, FeatureExtractor
from .coreset import farthest_first, greedy_coreset, random_projection
from .knn import nearest_neighbors

__all__ = [
    "BackboneError",
    "FeatureExtractor",
    "farthest_first",
    "greedy_coreset",
    "nearest_neighbors",
    "random_projection",
]
