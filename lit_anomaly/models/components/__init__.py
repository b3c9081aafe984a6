from .backbones import BackboneError, FeatureExtractor
from .blur import blur_kernel_size, smooth
from .coreset import farthest_first, greedy_coreset, image_blocks, random_projection
from .knn import largest_nearest_distances, nearest_distances, nearest_neighbors
from .tiling import TileGrid

__all__ = [
    "BackboneError",
    "FeatureExtractor",
    "TileGrid",
    "blur_kernel_size",
    "farthest_first",
    "greedy_coreset",
    "image_blocks",
    "largest_nearest_distances",
    "nearest_distances",
    "nearest_neighbors",
    "random_projection",
    "smooth",
]
