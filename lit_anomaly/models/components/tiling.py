"""Feature maps of large images from overlapping square tiles, stitched into one seamless field per stage."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor


@dataclass(frozen=True)
class TileAxis:
    """Tiles along one axis of an image.

    Args:
        starts: the first pixel of each tile.
        length: the tiles' length in px: at most the tile size, and no longer than the count of tiles needs.
        bounds: the stitched field takes pixels bounds[i] .. bounds[i + 1] from tile i: its neighbours meet halfway
            through their overlap, so every kept feature sees at least half the overlap of context beyond it.
    """

    starts: tuple[int, ...]
    length: int
    bounds: tuple[int, ...]


def tile_axis(size: int, tile: int, overlap: int, align: int) -> TileAxis:
    """The fewest tiles of at most `tile` px that cover `size` px with neighbours sharing about `overlap` px, as
    short as that allows (less overlap to compute twice), every start and bound a multiple of `align` (the
    coarsest feature stride, so that every stage's grid splits at whole cells)."""
    if size <= tile:
        return TileAxis((0,), size, (0, size))
    count = math.ceil((size - overlap) / (tile - overlap))
    tile = min(tile, align * math.ceil((size + (count - 1) * overlap) / count / align))
    last = size - tile
    starts = tuple(round(i * last / (count - 1) / align) * align for i in range(count))
    middles = [(start + previous + tile) // 2 // align * align for previous, start in pairwise(starts)]
    return TileAxis(starts, tile, (0, *middles, size))


@dataclass(frozen=True)
class TileGrid:
    """Square tiles over (H, W) images and how their feature maps stitch back together.

    Args:
        rows: the tiles along the height.
        columns: the tiles along the width.
    """

    rows: TileAxis
    columns: TileAxis

    @classmethod
    def covering(cls, size: tuple[int, int], tile: int, overlap: int, align: int) -> TileGrid:
        return cls(tile_axis(size[0], tile, overlap, align), tile_axis(size[1], tile, overlap, align))

    def __len__(self) -> int:
        return len(self.rows.starts) * len(self.columns.starts)

    def cut(self, images: Tensor) -> Tensor:
        """(B * T, C, h, w) tiles of (B, C, H, W) `images`, image by image, row by row."""
        height, width = self.rows.length, self.columns.length
        tiles = [images[..., y : y + height, x : x + width] for y in self.rows.starts for x in self.columns.starts]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def stitch(self, features: Tensor, stride: int) -> Tensor:
        """The (B, C, H / stride, W / stride) field of (B * T, C, h, w) tile `features` (as `cut` orders them):
        each tile gives the cells between its bounds. The batch stays symbolic when exported."""
        tiles = features.unflatten(0, (-1, len(self.rows.starts), len(self.columns.starts))).movedim((1, 2), (0, 1))
        rows = []
        for i, y in enumerate(self.rows.starts):
            top, bottom = (self.rows.bounds[i] - y) // stride, (self.rows.bounds[i + 1] - y) // stride
            row = []
            for j, x in enumerate(self.columns.starts):
                left, right = (self.columns.bounds[j] - x) // stride, (self.columns.bounds[j + 1] - x) // stride
                row.append(tiles[i, j, :, :, top:bottom, left:right])
            rows.append(torch.cat(row, dim=-1))
        return torch.cat(rows, dim=-2)


def tiled(
    extract: Callable[[Tensor], list[Tensor]], images: Tensor, grid: TileGrid, strides: list[int]
) -> list[Tensor]:
    """`extract`'s feature maps of `images`, computed tile by tile and stitched; `strides`: of each map."""
    return [grid.stitch(f, s) for f, s in zip(extract(grid.cut(images)), strides, strict=True)]
