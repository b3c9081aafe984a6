from .backbones import BackboneError, FeatureExtractor
from .blur import blur_kernel_size, smooth
from .coreset import farthest_first, greedy_coreset, image_blocks, random_projection
from .knn import max_nearest_distance, nearest_distances, nearest_neighbors

__all__ = [
    "BackboneError",
    "FeatureExtractor",
    "blur_kernel_size",
    "farthest_first",
    "greedy_coreset",
    "image_blocks",
    "max_nearest_distance",
    "nearest_distances",
    "nearest_neighbors",
    "random_projection",
    "smooth",
]
