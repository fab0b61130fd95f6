"""
Images as Video-R1's later trainer reads them (its vendored qwen-vl-utils, src/qwen-vl-utils/src/qwen_vl_utils/
vision_process.py: fetch_image), then the family's own image processor's resize (its preprocessor_config.json bounds).
data.py turns the result into patch rows with the video path's video_to_patches (the image repeated to the temporal
patch), exactly the rows of transformers' Qwen2VLImageProcessor (test_data.py checks them against it).

    read_image(path, min_pixels, max_pixels, factor) -> (H, W, 3) uint8: RGB (RGBA over white), smart_resize, PIL's
                                                         default resize (bicubic), as fetch_image
    processor_resize(image, bounds, factor)          -> the image processor's own smart_resize (a no-op when the
                                                         first one already fits its bounds, as with Video-R1's)
"""
import math

import numpy as np

# Video-R1's copy: "MIN_PIXELS = 4 * 28 * 28 / MAX_PIXELS = 256 * 28 * 28" (upstream qwen-vl-utils: 16384 * 28 * 28),
# i.e. 4 and 256 merged patches of 28 px; a family with 32-px merged patches (Qwen3-VL) gets 4 and 256 of its own
IMAGE_MIN_PATCHES = 4
IMAGE_MAX_PATCHES = 256
MAX_RATIO = 200
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """An image that cannot be read (missing, corrupt, not an image, aspect ratio over 200)."""


def smart_resize(height, width, factor=28, min_pixels=128 * 28 * 28, max_pixels=128 * 28 * 28):
    """Qwen's target size: sides multiples of factor, area within [min_pixels, max_pixels], aspect ~kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"smart_resize: aspect ratio of {height}x{width} is above {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image):
    """fetch_image's to_rgb: RGBA pasted over white through its alpha, every other mode PIL's convert("RGB")."""
    from PIL import Image
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def read_image(path, min_pixels, max_pixels, factor=28):
    """fetch_image on a local file: RGB, smart_resize(factor, [min_pixels, max_pixels]), PIL's default resize
    (`image.resize((w, h))`: bicubic for RGB). (H, W, 3) uint8, sides multiples of factor."""
    from PIL import Image
    try:
        with Image.open(path) as opened:
            image = to_rgb(opened)  # reads the pixels: a truncated file fails here
        h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, not an image, corrupt, aspect > 200
        raise ImageError(f"read_image: cannot read {path}: {e}") from e
    return np.asarray(image.resize((w, h)))                                   # (h, w, 3) uint8


def processor_bounds(config):
    """(min_pixels, max_pixels) of an image processor's preprocessor_config.json dict: its min_pixels / max_pixels
    (Qwen2/2.5-VL: 3136, 12845056), else size.shortest_edge / longest_edge (Qwen3-VL: 65536, 16777216); 0 when absent."""
    size = config.get("size") or {}
    return (int(config.get("min_pixels") or size.get("shortest_edge") or 0),
            int(config.get("max_pixels") or size.get("longest_edge") or 0))


def processor_resize(image, bounds, factor):
    """The image processor's own resize of the reader's image: smart_resize to its bounds, PIL bicubic when the size
    changes (Qwen2VLImageProcessor's resample), else the image untouched. (H, W, 3) uint8 -> (H', W', 3) uint8"""
    from PIL import Image
    lo, hi = bounds
    if not lo or not hi:
        return image
    h, w = smart_resize(image.shape[0], image.shape[1], factor, lo, hi)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
