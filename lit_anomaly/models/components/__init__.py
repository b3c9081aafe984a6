from .backbones import FeatureExtractor, WeightsError
from .coreset import greedy_coreset, random_projection
from .knn import nearest_neighbors

__all__ = ["FeatureExtractor", "WeightsError", "greedy_coreset", "nearest_neighbors", "random_projection"]
