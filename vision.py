"""
Pixels for the model: videos and images read as Video-R1's vendored qwen-vl-utils reads them (src/qwen-vl-utils/src/
qwen_vl_utils/vision_process.py: fetch_video, fetch_image), resized by Qwen's smart_resize, and laid out in the patch
rows transformers' Qwen2-VL processors make. data.py turns them into prompts and batches.

    read_video(path, ...)              -> uint8 frames (T, H, W, 3), sampled and resized exactly like fetch_video
    frame_size(height, width, nframes) -> the (h, w) fetch_video resizes to (its pixel budget per frame)
    video_to_patches(frames, ...)      -> pixel_values (N, C*2*14*14), grid_thw (1, 3); an image is repeated to the
                                          temporal patch first (data.py), exactly the rows of Qwen2VLImageProcessor
    read_image(path, min_pixels, max_pixels, factor) -> (H, W, 3) uint8: RGB (RGBA over white), smart_resize, PIL's
                                                         default resize (bicubic), as fetch_image
    processor_resize(image, bounds, factor)          -> the image processor's own smart_resize (a no-op when the
                                                         first one already fits its bounds, as with Video-R1's)

No torchvision: frames are decoded with decord and resized with the very torch call that qwen-vl-utils' torchvision
resize(BICUBIC, antialias=True) makes on uint8 tensors (float32 bicubic interpolate, clamp, round). PIL's bicubic is
not used for frames: it rounds to uint8 between its two passes, which moves up to ~20% of pixels by up to ~10 levels.
"""
import contextlib
import math
import os
import re
import sys
import tempfile

import numpy as np
import torch

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


# ----------------------------------------------------------------------------- video

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Video-R1's first trainer's own copy of qwen-vl-utils (src/qwen-vl-utils/src/qwen_vl_utils/vision_process.py): frames come in pairs;
# "VIDEO_MIN_PIXELS = 128 * 28 * 28 / VIDEO_MAX_PIXELS = 128 * 28 * 28" (upstream qwen-vl-utils has 768 * 28 * 28)
FRAME_FACTOR = 2
VIDEO_MAX_PIXELS = 128 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # its default VIDEO_MAX_PIXELS env var: a 128K-token budget


class VideoError(ValueError):
    """A video that cannot be decoded (missing, empty, corrupt, too short)."""



def frame_size(height, width, nframes, min_pixels=128 * 28 * 28, max_pixels=0, factor=28, video_max_pixels=0):
    """The (h, w) Video-R1's reader (fetch_video) resizes nframes frames of height x width to. Video-R1's first trainer passed no pixel
    bounds with a video, so its cap was max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2), int(min_pixels * 1.05))
    = 105,369 pixels at min_pixels 128*28*28 (a 640x480 clip: 280x364). max_pixels 0 = that rule; a positive
    max_pixels can only lower the cap, as an explicit `max_pixels` does in fetch_video. factor: patch * merge (Qwen3-VL:
    32, its min_pixels 128*32*32, the same 128 merged patches, and its cap int(1.05 * 128*32*32) = 137,625 pixels).
    video_max_pixels replaces the reader's VIDEO_MAX_PIXELS constant in that rule, as Video-R1's README has one edit its
    copy for evaluation ("256 x 28 x 28"); 0: VIDEO_MAX_PIXELS (128 merged patches of the family)."""
    video_max = video_max_pixels or VIDEO_MAX_PIXELS // 28 ** 2 * factor ** 2
    cap = max(min(video_max, VIDEO_TOTAL_PIXELS / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return smart_resize(height, width, factor, min_pixels, min(max_pixels, cap) if max_pixels > 0 else cap)


def read_video(path, fps=2.0, min_frames=4, max_frames=16, min_pixels=128 * 28 * 28, max_pixels=0, factor=28,
               with_meta=False, video_max_pixels=0):
    """Decode ~fps frames per second, evenly spaced, resized Qwen's way. Returns (frames (T, H, W, 3) uint8, sample_fps),
    with_meta: and {"frame_indices", "video_fps"} (the video's own fps: Qwen3-VL's timestamps need both)."""
    import decord  # imported here: a module that only builds prompts should not need it

    path = str(path)
    decoder = []  # what ffmpeg and decord's C++ code write to fd 2: folded into the one error line, not the log
    try:
        with _decoder_messages(decoder):
            vr = decord.VideoReader(path)
            total, video_fps = len(vr), float(vr.get_avg_fps())
    except Exception as e:  # decord raises a bare RuntimeError (DECORDError) for missing/empty/corrupt files
        raise VideoError(f"read_video: cannot open {path}: {str(e).splitlines()[0]}{_folded(decoder)}") from e
    if total <= 0 or not video_fps > 0:
        raise VideoError(f"read_video: {path} has {total} frames at {video_fps} fps")
    # qwen-vl-utils' smart_nframes: fps-based count, clamped, then floored to an even number
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    nframes = min(max(total / video_fps * fps, lo), hi, total)
    nframes = math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total:
        raise VideoError(f"read_video: {path} is too short ({total} frames) to sample {FRAME_FACTOR}")
    idx = torch.linspace(0, total - 1, nframes).round().long().tolist()  # torch's float32 linspace, as Qwen's
    try:
        with _decoder_messages(decoder):
            frames = vr.get_batch(idx).asnumpy()  # (T, H0, W0, 3) uint8 RGB
    except Exception as e:
        raise VideoError(f"read_video: cannot decode frames of {path}: {str(e).splitlines()[0]}{_folded(decoder)}") from e
    sample_fps = nframes / max(total, 1e-6) * video_fps
    h, w = frame_size(frames.shape[1], frames.shape[2], nframes, min_pixels, max_pixels, factor, video_max_pixels)
    if (h, w) != frames.shape[1:3]:  # torchvision returns the input untouched when the size already matches
        # = torchvision's tensor resize(BICUBIC, antialias=True) on uint8: float32 interpolate, clamp, round
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H0, W0)
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        frames = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    if with_meta:
        return frames, sample_fps, {"frame_indices": idx, "video_fps": video_fps}
    return frames, sample_fps  # (T, h, w, 3) uint8


@contextlib.contextmanager
def _decoder_messages(sink):
    """fd 2 (where ffmpeg and decord's C++ code print, below Python's sys.stderr) into a temporary file for the block;
    its text is appended to sink."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sink.append(captured.read().decode(errors="replace"))


def _folded(messages):
    """The decoder's lines as one suffix, their prefixes ("[12:00:00] src/video/video_reader.cc:83: ", "[mov,mp4 @
    0x55..] ") dropped: " (decoder: ERROR opening: x.mp4, Invalid data ...; moov atom not found)"."""
    lines = [re.sub(r"^(\[[^\]]*\] )?(\S+\.cc:\d+: )?", "", line).strip() for text in messages for line in text.splitlines()]
    lines = list(dict.fromkeys(line for line in lines if line))
    return f" (decoder: {'; '.join(lines)})" if lines else ""


def video_to_patches(frames, patch_size=14, temporal_patch_size=2, merge_size=2, mean=CLIP_MEAN, std=CLIP_STD):
    """Qwen2-VL's video patches: (grid_t*grid_h*grid_w, 3*tps*ps*ps) float32 and video_grid_thw (1, 3)."""
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    T, C, H, W = x.shape
    assert C == 3 and H % (patch_size * merge_size) == 0 and W % (patch_size * merge_size) == 0, \
        f"video_to_patches: frames {tuple(x.shape)} need 3 channels and sides divisible by {patch_size * merge_size}"
    # rescale (1/255) fused into normalise, exactly as transformers computes it: (x - 255*mean) / (255*std)
    mean255 = (torch.tensor(mean, dtype=torch.float32) * 255.0).view(1, 3, 1, 1)
    std255 = (torch.tensor(std, dtype=torch.float32) * 255.0).view(1, 3, 1, 1)
    x = (x - mean255) / std255
    if T % temporal_patch_size:  # pad time by repeating the last frame
        x = torch.cat([x, x[-1:].expand(temporal_patch_size - T % temporal_patch_size, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // temporal_patch_size, H // patch_size, W // patch_size
    x = x.view(gt, temporal_patch_size, C, gh // merge_size, merge_size, patch_size,
               gw // merge_size, merge_size, patch_size)
    # -> (gt, gh/m, gw/m, m, m, C, tps, ps, ps): the 2x2 merged patches are contiguous, as the LLM expects
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(gt * gh * gw, C * temporal_patch_size * patch_size * patch_size).contiguous()
    return pixel_values, torch.tensor([[gt, gh, gw]], dtype=torch.long)
