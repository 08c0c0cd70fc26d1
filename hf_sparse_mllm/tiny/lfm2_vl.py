"""Tiny LFM2-VL (`lfm2_vl`): SigLIP2 NaFlex vision tower, pixel-unshuffle projector, LFM2 decoder (convolution and
attention layers), dynamic tiling.

Geometry (defaults): 4 px patches unshuffled 2 x 2 (8 px per visual token). [`TinyLfm2VlImageProcessor`] resizes an
image, keeping its aspect ratio, to sides that are multiples of 8 px with between 4 and 16 visual tokens (one tile):
a 40 x 30 (width x height) image becomes 32 x 24, 3 rows of 4 visual tokens (12), a 30 x 60 image 16 x 40, 5 rows
of 2 (10). An image more than twice that budget is split into square 32 px tiles (4 rows of 4 tokens each, at most
4 tiles, the grid closest to its aspect ratio) plus a thumbnail of the whole image, last: an 80 x 40 image gives
2 tiles and a 40 x 16 thumbnail, 16 + 16 + 10 visual tokens (42). `pixel_values` is `(tiles of all images, 64,
3 * 4 * 4)`: each tile's patches in raster order, zero-padded to 64 patches, with `pixel_attention_mask` `(tiles,
64)` (0 on the padding) and `spatial_shapes` `(tiles, 2)`, the `(rows, cols)` of each tile's patches.
`get_image_features(...).pooler_output` is a list with one `(rows // 2 * cols // 2, hidden)` tensor per tile, in
raster order over the unshuffled grid.

The chat template writes `<image>`, which [`~transformers.Lfm2VlProcessor`] expands to `<|image_start|> <image> x N
<|image_end|>` for one tile, or, for a tiled image, `<|image_start|>`, `<|img_row_r_col_c|> <image> x 16` per tile,
`<|img_thumbnail|> <image> x N`, `<|image_end|>`: every tile is one placeholder run. The decoder alternates an LFM2
short-convolution layer and a full-attention layer (conv first); real LFM2 decoders mix the same two kinds.

The image processor is [`TinyLfm2VlImageProcessor`]: `transformers` 5.24 has only a torchvision backend for
LFM2-VL (`Lfm2VlImageProcessor`), so this one does the same resizing, tiling and patching with PIL and NumPy (PIL
resampling, so pixel values differ slightly from the torchvision class; the geometry is the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from transformers import (
    AutoImageProcessor,
    BatchFeature,
    Lfm2Config,
    Lfm2VlConfig,
    Lfm2VlForConditionalGeneration,
    Lfm2VlProcessor,
    Siglip2VisionConfig,
)
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs

from ._common import TinyBuild, TinyBuilderKwargs, Unpack
from .registry import register_tiny_family

LFM2_VL_TOKENS = {
    "image_start_token": "<|image_start|>",
    "image_end_token": "<|image_end|>",
    "image_thumbnail_token": "<|img_thumbnail|>",
}


class Lfm2VlImagesKwargs(ImagesKwargs, total=False):
    """The image keyword arguments of `Lfm2VlImageProcessor` (whose module needs torchvision), described there."""

    downsample_factor: int
    do_image_splitting: bool
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    min_image_tokens: int
    max_image_tokens: int
    encoder_patch_size: int
    tile_size: int
    max_pixels_tolerance: float
    do_pad: bool
    return_row_col_info: bool


class TinyLfm2VlImageProcessor(PilBackend):
    """
    A PIL/NumPy image processor with `Lfm2VlImageProcessor`'s geometry and outputs: smart resizing of an image to one
    tile, or tiling of a large one (plus a thumbnail), patches of `encoder_patch_size` in raster order zero-padded to
    the most a tile can have, `pixel_attention_mask` and `spatial_shapes`; with `return_row_col_info` (set by
    [`~transformers.Lfm2VlProcessor`]) also the `image_rows`, `image_cols` and `image_sizes` the processor expands
    the placeholders from. It saves and reloads with `AutoImageProcessor` (and `AutoProcessor`) in any process that
    imported `hf_sparse_mllm.tiny`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import TinyLfm2VlImageProcessor
    >>> image_processor = TinyLfm2VlImageProcessor(encoder_patch_size=4, tile_size=32, max_image_tokens=16)
    >>> out = image_processor([Image.new("RGB", (80, 40))], return_row_col_info=True, return_tensors="pt")
    >>> out["pixel_values"].shape, out["spatial_shapes"].tolist()  # 2 tiles and a thumbnail, 64 patches max
    (torch.Size([3, 64, 48]), [[8, 8], [8, 8], [4, 10]])
    >>> out["image_rows"].tolist(), out["image_cols"].tolist(), out["pixel_attention_mask"].sum(-1).tolist()
    ([1], [2], [64, 64, 40])

    ```
    """

    valid_kwargs = Lfm2VlImagesKwargs
    downsample_factor = 2
    do_image_splitting = True
    min_tiles = 2
    max_tiles = 10
    use_thumbnail = True
    min_image_tokens = 64
    max_image_tokens = 256
    encoder_patch_size = 16
    tile_size = 512
    max_pixels_tolerance = 2.0
    do_resize = True
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_pad = True
    return_row_col_info = False
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]

    def __init__(self, **kwargs: Unpack[Lfm2VlImagesKwargs]):
        super().__init__(**kwargs)

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        # The size is computed per image, so `do_resize` needs no `size`.
        kwargs.pop("do_resize", None)
        super()._validate_preprocess_kwargs(**kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        resample: PILImageResampling | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        downsample_factor: int,
        do_image_splitting: bool,
        min_tiles: int,
        max_tiles: int,
        use_thumbnail: bool,
        min_image_tokens: int,
        max_image_tokens: int,
        encoder_patch_size: int,
        tile_size: int,
        max_pixels_tolerance: float,
        do_pad: bool,
        return_row_col_info: bool,
        return_tensors,
        **kwargs,
    ) -> BatchFeature:
        if not do_pad:
            raise ValueError(
                f"{type(self).__name__} pads every tile to the same number of patches; do_pad=False is not supported."
            )
        if not do_image_splitting:
            min_tiles = max_tiles = 1
        if min_tiles > max_tiles:
            raise ValueError(f"min_tiles must be at most max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
        patch, factor = encoder_patch_size, downsample_factor
        max_patches = max(max_image_tokens * factor**2, (tile_size // patch) ** 2 if do_image_splitting else 0)
        values, masks, shapes, rows, cols, sizes = [], [], [], [], [], []
        for image in images:
            height, width = image.shape[-2:]
            new_height, new_width = _smart_resize(height, width, patch * factor, min_image_tokens, max_image_tokens)
            too_large = _rounded_area(height, width, patch, factor) > (
                max_image_tokens * (patch * factor) ** 2 * max_pixels_tolerance
            )
            if too_large and not min_tiles == max_tiles == 1:
                grid_cols, grid_rows = _closest_grid(height, width, min_tiles, max_tiles, tile_size)
                resized = self.resize(
                    image, SizeDict(height=tile_size * grid_rows, width=tile_size * grid_cols), resample=resample
                )
                tiles = [
                    resized[:, r * tile_size : (r + 1) * tile_size, c * tile_size : (c + 1) * tile_size]
                    for r in range(grid_rows)
                    for c in range(grid_cols)
                ]
                if use_thumbnail and grid_rows * grid_cols != 1:
                    tiles.append(self.resize(image, SizeDict(height=new_height, width=new_width), resample=resample))
            else:
                grid_rows = grid_cols = 1
                tiles = [self.resize(image, SizeDict(height=new_height, width=new_width), resample=resample)]
            rows.append(grid_rows)
            cols.append(grid_cols)
            sizes.append([new_height, new_width])
            for tile in tiles:
                if do_rescale:
                    tile = self.rescale(tile, rescale_factor)
                if do_normalize:
                    tile = self.normalize(tile, image_mean, image_std)
                patches, mask = _pad_patches(_patchify(tile, patch), max_patches)
                values.append(patches)
                masks.append(mask)
                shapes.append([tile.shape[-2] // patch, tile.shape[-1] // patch])
        data = {
            "pixel_values": np.stack(values).astype(np.float32),
            "pixel_attention_mask": np.stack(masks),
            "spatial_shapes": np.array(shapes, dtype=np.int64),
        }
        if return_row_col_info:
            data.update(image_rows=rows, image_cols=cols, image_sizes=sizes)
        return BatchFeature(data=data, tensor_type=return_tensors)


# Registered under a string key, not `Lfm2VlConfig`, so real LFM2-VL checkpoints still load the stock class.
AutoImageProcessor.register(
    f"hf_sparse_mllm.tiny.{TinyLfm2VlImageProcessor.__name__}",
    image_processor_classes={"pil": TinyLfm2VlImageProcessor},
    exist_ok=True,
)


def _round_by(number: float, factor: int) -> int:
    return round(number / factor) * factor


def _rounded_area(height: int, width: int, patch: int, factor: int) -> int:
    """The pixels of an image rounded to whole visual tokens, as `Lfm2VlImageProcessor._is_image_too_large` counts."""
    side = patch * factor
    return max(patch, _round_by(height, side)) * max(patch, _round_by(width, side))


def _smart_resize(height: int, width: int, side: int, min_tokens: int, max_tokens: int) -> tuple[int, int]:
    """`(height, width)` in multiples of `side` (px per visual token), near the image's aspect ratio, with
    `min_tokens` to `max_tokens` visual tokens (`Lfm2VlImageProcessor.smart_resize`)."""
    new_height, new_width = max(side, _round_by(height, side)), max(side, _round_by(width, side))
    if new_height * new_width > max_tokens * side**2:
        beta = math.sqrt(height * width / (max_tokens * side**2))
        new_height = max(side, math.floor(height / beta / side) * side)
        new_width = max(side, math.floor(width / beta / side) * side)
    elif new_height * new_width < min_tokens * side**2:
        beta = math.sqrt(min_tokens * side**2 / (height * width))
        new_height, new_width = math.ceil(height * beta / side) * side, math.ceil(width * beta / side) * side
    return new_height, new_width


def _closest_grid(height: int, width: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """`(cols, rows)` of tiles closest to the image's aspect ratio (`Lfm2VlImageProcessor._get_grid_layout`)."""
    # The candidates in the order `Lfm2VlImageProcessor._target_ratios` gives them (ties go to the first).
    candidates = [
        (w, h)
        for n in range(min_tiles, max_tiles + 1)
        for w in range(1, n + 1)
        for h in range(1, n + 1)
        if min_tiles <= w * h <= max_tiles
    ]
    grids = sorted(set(candidates), key=lambda grid: grid[0] * grid[1])
    aspect_ratio, best, best_diff = width / height, (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect_ratio - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and height * width > 0.5 * tile_size**2 * grid[0] * grid[1]:
            best = grid  # as close: the larger grid when the image fills more than half of it
    return best


def _patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """`(channels, height, width)` -> `(patches, patch * patch * channels)`, patches in raster order."""
    channels, height, width = image.shape
    patches = image.reshape(channels, height // patch, patch, width // patch, patch).transpose(1, 3, 2, 4, 0)
    return patches.reshape((height // patch) * (width // patch), -1)


def _pad_patches(patches: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(length, dtype=np.int32)
    mask[: len(patches)] = 1
    return np.pad(patches, [(0, length - len(patches)), (0, 0)]), mask


class Lfm2VlBuilderKwargs(TinyBuilderKwargs, total=False):
    """The keyword arguments of [`build_tiny_lfm2_vl`]: every builder's and its image geometry."""

    patch_size: int
    downsample_factor: int
    tile_size: int
    min_image_tokens: int
    max_image_tokens: int
    max_tiles: int


@register_tiny_family("lfm2_vl")
def build_tiny_lfm2_vl(
    *, words: Iterable[str], **kwargs: Unpack[Lfm2VlBuilderKwargs]
) -> tuple[Lfm2VlForConditionalGeneration, Lfm2VlProcessor]:
    """
    Build a tiny LFM2-VL (SigLIP2 NaFlex tower, pixel-unshuffle projector, LFM2 decoder with convolution and attention
    layers, dynamic tiling) and its processor, offline.

    The arguments not listed here, and the `(model, processor)` it returns, are those of every tiny builder, see
    [`build_tiny_model_and_processor`]; the decoder's layers alternate convolution (even) and full attention (odd).

    Args:
        patch_size (`int`, *optional*, defaults to `4`):
            Patch side of the vision tower (the image processor's `encoder_patch_size`).
        downsample_factor (`int`, *optional*, defaults to `2`):
            Side `f` of the square of patches the projector's pixel unshuffle turns into one visual token.
        tile_size (`int`, *optional*, defaults to `32`):
            Side (px) of the tiles of a large image; a multiple of `patch_size * downsample_factor`.
        min_image_tokens (`int`, *optional*, defaults to `4`):
            Fewest visual tokens of an image of one tile (and of a thumbnail).
        max_image_tokens (`int`, *optional*, defaults to `16`):
            Most visual tokens of an image of one tile (and of a thumbnail); an image more than twice as large is
            tiled.
        max_tiles (`int`, *optional*, defaults to `4`):
            Most tiles of a large image (at least 2), besides its thumbnail.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_sparse_mllm.tiny import build_tiny_lfm2_vl
    >>> model, processor = build_tiny_lfm2_vl(words=["what", "color", "red"])
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    >>> text = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> text
    '<s> user : <image> what color ? assistant :'
    >>> inputs = processor(text=[text], images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    >>> sorted(inputs)
    ['attention_mask', 'input_ids', 'pixel_attention_mask', 'pixel_values', 'spatial_shapes']
    >>> processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, 3:6].tolist())
    ['<|image_start|>', '<image>', '<image>']
    >>> (inputs["input_ids"] == model.config.image_token_id).sum().item(), inputs["spatial_shapes"].tolist()
    (12, [[6, 8]])
    >>> pixels = {k: inputs[k] for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask")}
    >>> features = model.model.get_image_features(**pixels)
    >>> [f.shape for f in features.pooler_output], model.config.text_config.layer_types
    ([torch.Size([12, 32])], ['conv', 'full_attention'])

    ```
    """
    build = TinyBuild.of("lfm2_vl", kwargs, Lfm2VlBuilderKwargs)
    patch_size = kwargs.get("patch_size", 4)
    factor = kwargs.get("downsample_factor", 2)
    tile_size = kwargs.get("tile_size", 32)
    min_image_tokens = kwargs.get("min_image_tokens", 4)
    max_image_tokens = kwargs.get("max_image_tokens", 16)
    max_tiles = kwargs.get("max_tiles", 4)
    if tile_size % (patch_size * factor):
        # The processor counts a tile's tokens rounding up, the model's unshuffle rounding down.
        raise ValueError(
            f"tile_size must be a multiple of patch_size * downsample_factor, got tile_size={tile_size}, "
            f"patch_size={patch_size}, downsample_factor={factor}"
        )
    if max_tiles < 2:
        raise ValueError(f"max_tiles must be at least 2 (the fewest tiles of a tiled image), got {max_tiles}")
    # One marker token per tile position of every grid the processor may choose.
    tile_markers = [
        f"<|img_row_{r}_col_{c}|>"
        for r in range(1, max_tiles + 1)
        for c in range(1, max_tiles + 1)
        if r * c <= max_tiles
    ]
    tokenizer = build.tokenizer(words, named_special_tokens=LFM2_VL_TOKENS, extra_special_tokens=tile_markers)
    image_processor = TinyLfm2VlImageProcessor(
        downsample_factor=factor,
        encoder_patch_size=patch_size,
        tile_size=tile_size,
        min_image_tokens=min_image_tokens,
        max_image_tokens=max_image_tokens,
        max_tiles=max_tiles,
    )
    processor = build.processor(Lfm2VlProcessor, image_processor, tokenizer)
    shape = build.shape
    vision_config = Siglip2VisionConfig(
        hidden_size=shape["vision_hidden_size"],
        intermediate_size=2 * shape["vision_hidden_size"],
        num_hidden_layers=shape["vision_layers"],
        num_attention_heads=shape["num_attention_heads"],
        patch_size=patch_size,
        # The position table is a square the tower interpolates to each tile's patch grid.
        num_patches=(tile_size // patch_size) ** 2,
        vision_use_head=False,
    )
    num_layers = shape["num_hidden_layers"]
    text_config = Lfm2Config(
        **build.text_config(tokenizer),
        layer_types=["full_attention" if i % 2 else "conv" for i in range(num_layers)],
        block_auto_adjust_ff_dim=False,
    )
    config = Lfm2VlConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=processor.image_token_id,
        downsample_factor=factor,
        projector_hidden_size=2 * shape["hidden_size"],
        tie_word_embeddings=False,
    )
    return build.model(Lfm2VlForConditionalGeneration, config, tokenizer), processor
