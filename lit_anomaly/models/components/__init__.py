from .backbones import BackboneError, FeatureExtractor
from .coreset import greedy_coreset, random_projection
from .knn import nearest_neighbors

__all__ = ["BackboneError", "FeatureExtractor", "greedy_coreset", "nearest_neighbors", "random_projection"]
