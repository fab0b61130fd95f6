"""
Qwen3-VL against transformers 5.23's own code, with the genuine tokenizer/processor files of Qwen3-VL-2B/4B/8B-Instruct
(../shared/qwen) and the two real videos (../shared/data); skipped when those are absent.

torchvision is not installed, and transformers' Qwen3VLVideoProcessor refuses to import without it (even its module-level
smart_resize sits behind the torchvision guard). So its frame sampling (`sample_frames`), resize rule (`smart_resize`)
and patch layout (`patchify`) are taken from the installed file's source and run as they are written there (hf_code);
the prompt is expanded by Qwen3VLProcessor's own replace_video_token / get_text_with_replacements, rendered by the
folder's chat template and tokenized by its tokenizer, as Qwen3VLProcessor.__call__ does. Only the resampling of the
pixels (torchvision's bicubic) is not compared here (test_data checks our resize against the same torch call).
"""
import ast
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import datatools
import model as model_lib
import vision

SHARED = Path(__file__).resolve().parent.parent / "shared"
QWEN3 = ["Qwen3-VL-2B-Instruct", "Qwen3-VL-4B-Instruct", "Qwen3-VL-8B-Instruct"]
VIDEOS = ["video1.mp4", "CATER_new_003595.mp4"]
PIXELS = 128 * 32 * 32  # per frame: the analogue of Video-R1's first trainer's 128*28*28 (128 merged patches)


def qwen_folder(name, tmp_path):
    """A model folder without weights: the genuine small files plus the shared BPE files (../shared/qwen/README.md)."""
    if not (SHARED / "qwen" / name).is_dir():
        pytest.skip(f"{SHARED / 'qwen' / name} absent")
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    for f in [*(SHARED / "qwen" / name).iterdir(), SHARED / "qwen" / "vocab.json", SHARED / "qwen" / "merges.txt"]:
        shutil.copy(f, tmp_path)
    return str(tmp_path)


def hf_code(name, cls=None):
    """A function (or a method of class `cls`) of transformers' video_processing_qwen3_vl.py, compiled from the installed
    file's source without its decorators and annotations (which name torchvision-only types)."""
    import transformers
    path = Path(transformers.__file__).parent / "models" / "qwen3_vl" / "video_processing_qwen3_vl.py"
    tree = ast.parse(path.read_text())
    scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body if cls else tree.body
    node = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list, node.returns = [], None
    for arg in node.args.args + node.args.kwonlyargs:
        arg.annotation = None
    namespace = {"math": math, "np": np, "torch": torch, "logger": SimpleNamespace(warning_once=print)}
    exec(compile(ast.fix_missing_locations(ast.Module([node], [])), str(path), "exec"), namespace)
    return namespace[name]


def official_prompt_ids(tokenizer, question, grid_thw, frame_indices, video_fps):
    """Qwen3VLProcessor's text path: the chat template's prompt, its <|video_pad|> replaced by replace_video_token's text
    (through get_text_with_replacements), then the tokenizer. The processor is built without its image/video processors
    (which need torchvision): these two methods read only the attributes set here."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    processor = object.__new__(Qwen3VLProcessor)
    processor.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    processor.image_token, processor.video_token, processor.audio_token = "<|image_pad|>", "<|video_pad|>", None
    processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": data.format_question(question)}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    metadata = SimpleNamespace(fps=video_fps, frames_indices=np.asarray(frame_indices))
    replacement = processor.replace_video_token({"video_grid_thw": grid_thw, "video_metadata": [metadata]}, 0)
    expanded, _ = processor.get_text_with_replacements([text], videos_replacements=[replacement])
    return expanded[0], tokenizer(expanded[0])["input_ids"]


@pytest.mark.parametrize("video", VIDEOS)
@pytest.mark.parametrize("name", QWEN3)
def test_show_equals_the_official_processor(name, video, tmp_path):
    # data.py --show's frames, frame size, grid, prompt ids and positions against transformers' Qwen3-VL code, at
    # fps 2, 4-16 frames, 128*32*32 pixels per frame
    folder = qwen_folder(name, tmp_path)
    if not (SHARED / "data" / video).is_file():
        pytest.skip(f"{SHARED / 'data' / video} absent")
    import decord
    from transformers import AutoTokenizer
    settings = data.video_settings_from_pretrained(folder, min_pixels=PIXELS, max_pixels=PIXELS)
    assert (settings.patch_size, settings.factor, settings.image_mean, settings.frame_timestamps) == (16, 32, (0.5,) * 3, True)
    shown, pixel_values = datatools.show_video(str(SHARED / "data" / video), folder, "How many cubes are there?", settings)

    reader = decord.VideoReader(str(SHARED / "data" / video))
    total, video_fps, (height, width) = len(reader), reader.get_avg_fps(), reader[0].shape[:2]
    # the video processor's sampling: self = its class defaults (fps 2) with min_frames 4 and max_frames 16
    indices = hf_code("sample_frames", "Qwen3VLVideoProcessor")(
        SimpleNamespace(fps=2, min_frames=4, max_frames=16), SimpleNamespace(total_num_frames=total, fps=video_fps))
    assert shown["frame_indices"] == indices.tolist() and shown["video_fps"] == pytest.approx(video_fps)
    T = len(indices)
    # its resize bounds the whole clip (T*h*w): size = 128*32*32 per frame times T frames is the per-frame bound
    h, w = hf_code("smart_resize")(num_frames=T, height=height, width=width, temporal_factor=2, factor=32,
                                   min_pixels=PIXELS * T, max_pixels=PIXELS * T)
    assert shown["frame_size"] == [h, w] and shown["grid_thw"] == [T // 2, h // 16, w // 16]
    assert shown["video_tokens"] == T // 2 * h * w // 16 ** 2 // 4

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text, ids = official_prompt_ids(tokenizer, "How many cubes are there?", torch.tensor([shown["grid_thw"]]), indices, video_fps)
    assert shown["input_ids"] == ids, "prompt ids differ from Qwen3VLProcessor's"
    assert shown["prompt"] == text
    assert text.count("<|vision_start|>") == T // 2 + 1  # one per frame pair, and the chat template's own around them
    if video.startswith("CATER"):  # its first pair: frames 0 and 20 of a 24-fps clip, (0 + 20) / 2 / 24 = 0.42 s
        assert "<|vision_start|><0.4 seconds><|vision_start|><|video_pad|>" in text
    # positions: the model's own get_rope_index, on the processor's ids and token types
    skeleton = model_lib.meta_model(folder)
    ids_t = torch.tensor([ids])
    positions, _ = skeleton.model.get_rope_index(ids_t, (ids_t == skeleton.config.video_token_id).long() * 2,
                                                 video_grid_thw=torch.tensor([shown["grid_thw"]]))
    assert shown["position_ids"] == positions[:, 0].tolist()

    # the patch rows: transformers' patchify of the normalised frames (mean = std = 0.5) is our layout
    frames, _ = vision.read_video(str(SHARED / "data" / video), 2.0, 4, 16, PIXELS, PIXELS, factor=32)
    x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # (T, 3, h, w)
    patches, *grid = hf_code("patchify", "Qwen3VLVideoProcessor")(None, x[None], patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == shown["grid_thw"]
    torch.testing.assert_close(pixel_values, patches[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", QWEN3)
def test_special_ids_and_untrained_rows(name, tmp_path):
    # the genuine vocabulary: 151,669 tokenizer ids against 151,936 embedding rows; the rows in between are never sampled
    folder = qwen_folder(name, tmp_path)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads(Path(folder, "config.json").read_text())
    vocab_rows = config["text_config"]["vocab_size"]
    assert (len(tokenizer), vocab_rows) == (151669, 151936)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in model_lib.VISION_TOKENS}
    assert ids == {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                   "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert (config["video_token_id"], config["vision_start_token_id"], config["vision_end_token_id"]) == (151656, 151652, 151653)
    eos, suppress = model_lib.special_token_ids(tokenizer, vocab_rows)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos and 151643 in eos  # <|endoftext|>
    assert set(suppress) == set(ids.values()) | set(range(151669, 151936))
    assert model_lib.model_family(folder) == "qwen3_vl"


def test_show_prints_one_json_line_for_every_family(tmp_path):
    # data.py --show on a tiny model of each family (a real video): the last line is the JSON object, the pixels are
    # saved; an unknown family exits 2 in one line
    import tiny
    video = SHARED / "data" / "CATER_new_003595.mp4"
    if not video.is_file():
        pytest.skip(f"{video} absent")
    for name, family in tiny.TINY_MODELS.items():
        folder = tiny.save_tiny_model(str(tmp_path / name), warm_start=False, family=family)
        out = subprocess.run([sys.executable, "data.py", "--show", str(video), "--model_name_or_path", folder,
                              "--max_frames", "4", "--min_pixels", "3136", "--max_pixels", "12544",
                              "--save_pixels", str(tmp_path / f"{name}.npy")],
                             capture_output=True, text=True, cwd=Path(__file__).parent, timeout=300)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout.strip().splitlines()[-1])
        assert shown["family"] == family and len(shown["frame_indices"]) == 4
        assert len(shown["position_ids"]) == 3 and all(len(p) == len(shown["input_ids"]) for p in shown["position_ids"])
        assert shown["input_ids"].count(tiny.build_tiny_tokenizer().convert_tokens_to_ids("<|video_pad|>")) == shown["video_tokens"]
        pixels = np.load(tmp_path / f"{name}.npy")
        patch = 16 if family in data.TIMESTAMPED else 14  # Qwen3-VL and Qwen3.5
        assert pixels.dtype == np.float32 and pixels.shape == (math.prod(shown["grid_thw"]), 3 * 2 * patch * patch)
        assert (shown["timestamps"] is not None) == (family in data.TIMESTAMPED)
    config = json.loads((tmp_path / "qwen3-vl" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(dict(config, model_type="llava")))
    out = subprocess.run([sys.executable, "data.py", "--show", str(video), "--model_name_or_path", str(tmp_path / "other")],
                         capture_output=True, text=True, cwd=Path(__file__).parent, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "llava" in out.stderr, out.stderr
    assert len([line for line in out.stderr.splitlines() if "error" in line]) == 1, out.stderr


def test_tiny_qwen3_with_the_real_tokenizer_trains_and_evaluates_on_real_videos(tmp_path):
    # a random tiny Qwen3-VL behind the genuine Qwen3-VL-2B tokenizer and processor files (151,936 embedding rows),
    # one GRPO step on the two real videos, then eval.py's both protocols on the result
    folder = qwen_folder("Qwen3-VL-2B-Instruct", tmp_path / "model")
    if not all((SHARED / "data" / v).is_file() for v in VIDEOS):
        pytest.skip("../shared/data videos absent")
    import eval as eval_lib
    import tiny
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tiny.build_tiny_model(tokenizer, family="qwen3_vl", vocab_size=151936).save_pretrained(folder)  # its config.json
    rows = tmp_path / "real.jsonl"
    rows.write_text("".join(json.dumps({"video_filename": str(SHARED / "data" / v), "problem": "How many objects are there?",
                                        "solution": "<answer>3</answer>"}) + "\n" for v in VIDEOS))
    video = ["--max_frames", "4", "--min_pixels", str(64 * 64), "--max_pixels", str(96 * 128)]
    # train in its own process: its ZeRO-3 load setting would stay in this one (model.partition_at_load)
    proc = subprocess.run([sys.executable, "train.py", "--model_name_or_path", folder, "--data", str(rows),
                           "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--num_generations", "2",
                           "--prompts_per_device", "2", "--max_completion_length", "6", "--no-bf16", "--num_workers", "0",
                           "--save_steps", "0", "--log_samples_steps", "0", *video],
                          capture_output=True, text=True, cwd=Path(__file__).parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1/1 | reward" in proc.stdout, proc.stdout[-2000:]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen3_vl"
    for protocol in ("train", "video-r1-first"):
        summary, = eval_lib.main(["--model", str(final), "--data", str(rows), "--max_new_tokens", "6", "--num_workers", "0",
                                  "--protocol", protocol, "--output", str(tmp_path / f"{protocol}.json"), *video])
        assert summary["n"] == 2 and not summary["skipped"], summary


@pytest.mark.parametrize("name", QWEN3)
def test_bench_shapes_are_the_genuine_configs(name):
    # bench.py --shape qwen3-vl-*: the values written in bench.py against the published config.json
    import bench
    import tiny
    path = SHARED / "qwen" / name / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    published = json.loads(path.read_text())
    shape = name.lower().removesuffix("-instruct")  # qwen3-vl-2b
    tokenizer = tiny.build_tiny_tokenizer()
    config = bench.qwen3_vl_config(shape, tokenizer)
    text, vision = config.text_config, config.vision_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act"):
        assert getattr(text, key) == published["text_config"][key], key
    assert text.rope_parameters["rope_theta"] == published["text_config"]["rope_theta"]
    assert text.rope_parameters["mrope_section"] == published["text_config"]["rope_scaling"]["mrope_section"]
    assert text.rope_parameters["mrope_interleaved"] is True
    for key, value in published["vision_config"].items():
        if key not in ("model_type", "initializer_range"):
            assert getattr(vision, key) == value, key
    assert config.tie_word_embeddings == published["tie_word_embeddings"]  # 8B: an untied LM head
    model = bench.build_model(shape, tokenizer, torch.device("meta"), torch.bfloat16, "sdpa")
    assert model.model.language_model.config._attn_implementation == "packed_sdpa"
    assert (bench.parameter_counts(model)["head"] > 0) == (not published["tie_word_embeddings"])
    # the KV cache of the memory table counts head_dim 128 (4B: not hidden / heads = 80)
    kv = bench.memory_per_gpu(model, world=4, lora_rank=0, B=1, G=8, P=1000, C=24)["KV cache (rollout)"]
    assert kv * 2**30 == text.num_hidden_layers * 2 * text.num_key_value_heads * 128 * 2 * 8 * 1024
    # the LoRA column's trainable parameters against peft's own count (2 layers; 4B's q_proj is 2560 -> 4096)
    from model import add_lora
    thin = bench.build_model(shape, tokenizer, torch.device("meta"), torch.bfloat16, "sdpa", layers=2)
    lora = bench.memory_per_gpu(thin, world=4, lora_rank=16, B=1, G=8, P=1000, C=24)["trainable parameters"]
    assert lora == sum(p.numel() for p in add_lora(thin, rank=16, alpha=32.0, target_modules="").parameters() if p.requires_grad)
    # the bench's video: Video-R1's first trainer's clip at 128*32*32 pixels, 16-px patches, a timestamp per frame pair
    batch = bench.build_batch(tokenizer, frames=16, prompts=1, device="cpu", seed=0, model_type="qwen3_vl")
    assert batch["video_grid_thw"][0].tolist() == [8, 20, 28] and batch["pixel_values_videos"].shape == (8 * 20 * 28, 1536)
    assert tokenizer.decode(batch["input_ids"][0]).count(" seconds>") == 8


def test_eval_refuses_a_folder_of_another_family_in_one_line(tmp_path, capsys):
    import eval as eval_lib
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(SystemExit) as exit_info:
        eval_lib.main(["--model", str(tmp_path / "llava"), "--data", str(tmp_path / "rows.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "model_type 'llava' is not supported; supported: qwen2_vl, qwen2_5_vl, qwen3_vl" in err


def test_default_frame_cap_is_128_merged_patches_at_factor_32():
    # max_pixels 0 (Video-R1's reader's rule): the cap 128*28*28 becomes 128*32*32 for Qwen3-VL, so a 640x360 clip of 16
    # frames is bounded as transformers' resize bounds it with 128*32*32 per frame; its time stamps are HF's formula
    h, w = vision.frame_size(360, 640, 16, min_pixels=64 * 32 * 32, max_pixels=0, factor=32)
    assert (h, w) == hf_code("smart_resize")(num_frames=16, height=360, width=640, temporal_factor=2, factor=32,
                                             min_pixels=64 * 32 * 32 * 16, max_pixels=PIXELS * 16) == (256, 480)
    assert vision.frame_size(360, 640, 16) == vision.frame_size(360, 640, 16, factor=28)  # Qwen2-VL's rule unchanged
    # an odd frame count repeats the last index to fill the last pair, as Qwen3VLProcessor._calculate_timestamps
    assert data.video_timestamps([0, 10, 20], 10.0) == [0.5, 2.0]
