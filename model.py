"""
The network: everything about the model that train.py, eval.py and bench.py share. Loading (and the family
differences), the special tokens, the vision pass, the rollout, the log-prob passes and the attention they run on.

    FAMILIES                               -> Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5: the one table of family differences
    load_model(dir)                        -> the policy, the language model on packed_attention
    add_lora(model, ...)                   -> the policy with LoRA adapters (peft); reference(...) = adapters off
    sample_completions(model, batch, ...)  -> G completions per prompt: vision once, prompt prefilled once; the decode
                                              loop eager here, or on decode.py's static KV cache (decode=)
    completion_logps(model, batch, ids)    -> per-token log-probs with grad (policy pass: prompt + G completions packed)
    completion_logps_shared_prompt(...)    -> the same without grad (reference: on the prompt's KV cache)

train.py keeps the config, the rewards-to-loss math and the loop; this file knows nothing of GRPO. The rollout's fast
decode (static cache, torch.compile, CUDA graphs) is decode.py's.
"""
import contextlib
import functools
import itertools
import json
import os
import re
import warnings

import torch


class ModelError(ValueError):
    """A model folder or setting that cannot work: reported in one line, exit code 2, before weights load."""


# ----------------------------------------------------------------------------------------------------------------
# log-probs and special tokens

def selective_log_softmax(logits, index, temperature=1.0, entropy=False):
    """log softmax(logits / temperature)[index], in fp32 (fp64 stays fp64) one row at a time. With grad it keeps
    only the logits themselves for the backward (their dtype, bf16 in training) and one logsumexp per position:
    autograd through the fp32 rows would keep an fp32 copy of all of them, 2x the bf16 logits (4,096 x 151,936 at Video-R1's
    G=8 x 512 tokens: 2.3 GiB more per GPU). (N, T, V), (N, T) -> (N, T)
    entropy=True: also each position's entropy -sum p log p of the same distribution (N, T), no grad, from the same
    row while it is in memory (--top_entropy_quantile)."""
    out = SelectiveLogSoftmax.apply(logits, index, temperature, entropy)
    return out if entropy else out[0]


class SelectiveLogSoftmax(torch.autograd.Function):
    """selective_log_softmax with its own backward, row by row: d/dlogits of log p[index] is
    (onehot(index) - softmax(logits / T)) / T times the incoming gradient; softmax recomputed from the saved logsumexp."""

    @staticmethod
    def forward(ctx, logits, index, temperature, entropy):
        log_probs, lse, entropies = [], [], []
        for row_logits, row_index in zip(logits, index):                              # (T, V), (T,)
            row = row_logits.to(torch.promote_types(row_logits.dtype, torch.float32)) / temperature  # only this row
            lse.append(torch.logsumexp(row, dim=-1))                                   # (T,)
            log_probs.append(row.gather(-1, row_index[:, None]).squeeze(-1) - lse[-1])
            if entropy:  # H = lse - sum p * logit: one more (T, V) temporary, freed with the row
                entropies.append(lse[-1] - (row - lse[-1][:, None]).exp_().mul_(row).sum(-1))  # (T,)
        ctx.save_for_backward(logits, index, torch.stack(lse))                         # (N, T, V), (N, T), (N, T)
        ctx.temperature = temperature
        if not entropy:
            return (torch.stack(log_probs),)                                           # (N, T)
        entropies = torch.stack(entropies)                                             # (N, T)
        ctx.mark_non_differentiable(entropies)
        return torch.stack(log_probs), entropies

    @staticmethod
    def backward(ctx, grad, *_):                                                       # (N, T); the entropy's: none
        logits, index, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)                                         # (N, T, V)
        for n in range(logits.size(0)):  # one fp32 (T, V) row at a time
            row = logits[n].to(lse.dtype, copy=True).div_(ctx.temperature).sub_(lse[n, :, None]).exp_()  # softmax
            row.mul_(-grad[n, :, None]).scatter_add_(-1, index[n, :, None], grad[n, :, None])
            grad_logits[n] = row.div_(ctx.temperature)
        return grad_logits, None, None, None


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def special_token_ids(tokenizer, vocab_size=None):
    """(EOS ids that end a completion, ids that must never be sampled), for training and eval alike. Never sampled: the
    vision tokens, and with the model's `vocab_size` every row past the tokenizer (Qwen2-VL: 152,064 embedding rows,
    ~151,657 tokenizer ids; the rest are untrained padding)."""
    eos = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tokenizer.eos_token_id})
    vision = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    untrained = list(range(len(tokenizer), vocab_size or 0))
    return [i for i in eos if i is not None], [i for i in vision if i is not None and i != tokenizer.unk_token_id] + untrained


def filter_logits(logits, top_k=0, top_p=1.0):
    """HF's top-k then top-p (TopKLogitsWarper, TopPLogitsWarper) on already temperature-scaled logits: top-k keeps
    the k largest (0: off); top-p the smallest set of most likely tokens whose probability reaches p (1.0: off), at
    least one token. Others become -inf. (N, V) -> (N, V)"""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)                              # ascending, (N, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)                                     # (N, V)
        drop = cum <= 1 - top_p  # the least likely tokens whose mass stays within 1 - p
        drop[:, -1] = False      # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


def completion_mask(completion_ids, eos_token_ids):
    """1 for tokens up to and including the first EOS, 0 after it. (N, T) -> (N, T) int"""
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), device=completion_ids.device))  # (N, T)
    T = completion_ids.size(1)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    return (torch.arange(T, device=completion_ids.device)[None] <= first_eos[:, None]).int()  # (N, T)


def decode_completions(tokenizer, completion_ids, mask):
    """Text of each completion up to and including its first EOS (special tokens dropped). (N, C), (N, C) -> N strings"""
    # cut at the mask rather than multiply by it: id 0 is an ordinary token in most vocabularies
    return [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(completion_ids.tolist(), mask.sum(1).tolist())]


# ----------------------------------------------------------------------------------------------------------------
# the passes: video features once per prompt, rollout, log-probs

def hf_model(model):
    """The transformers model inside a peft wrapper (LoRA), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def grids(batch, key):
    """batch[key] ("image_grid_thw" or "video_grid_thw", (n, 3)), or None when the batch holds none of that kind."""
    grid = batch.get(key)
    return grid if grid is not None and len(grid) else None


def vision_features(model, batch):
    """The model's `mm_encoder_outputs` ({"image": ..., "video": ...}, each kind only when the batch holds it): the vision
    tower runs ONCE per pass on the images and the videos together (every pass then reuses it). Whatever a rank's rows
    hold, it makes the same one call: under ZeRO-3 every rank then runs the same parameter gathers. The tower treats
    each grid on its own (attention within an image or a frame pair, windows and rotary positions per grid), so one call
    is the two transformers would make (test_grpo.py checks the passes against its forward)."""
    images, videos = grids(batch, "image_grid_thw"), grids(batch, "video_grid_thw")
    parts = [(batch[k], g) for k, g in (("pixel_values", images), ("pixel_values_videos", videos)) if g is not None]
    pixels, grid_thw = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])  # (sum N_i, 1176), (I+V, 3)
    feats = hf_model(model).model.get_image_features(pixels, grid_thw)  # the same as get_video_features: I+V x (n_i, D)
    # the whole output: Qwen3-VL's forward also reads its deepstack_features (added after the first decoder layers);
    # only the unmerged patch states are dropped, nothing reads them and they need not stay alive
    n_images, out = 0 if images is None else len(images), {}
    for kind, part, grid in (("image", slice(0, n_images), images), ("video", slice(n_images, None), videos)):
        if grid is not None:
            split = {"pooler_output": tuple(feats.pooler_output[part])}
            if getattr(feats, "deepstack_features", None) is not None:
                split["deepstack_features"] = [tuple(layer[part]) for layer in feats.deepstack_features]
            out[kind] = type(feats)(**split)
    return out


def position_inputs(model, batch):
    """The batch entries the family's M-RoPE needs besides the grids (Qwen2.5-VL: second_per_grid_ts, one per video
    (V,)), as keywords for its position function (FAMILIES) and the model's forward."""
    keys = FAMILIES[model.config.model_type][1]
    missing = [k for k in keys if k not in batch]
    assert not missing, f"{model.config.model_type} needs batch{missing} (data.collate makes it from each video's sample fps)"
    return {k: batch[k] for k in keys}


def release_positions(mm_token_type_ids, attention_mask, video_grid_thw, spatial_merge_size, second_per_grid_ts=None,
                      tokens_per_second=1, image_grid_thw=None):
    """M-RoPE positions by the rule Qwen2-VL and Qwen2.5-VL were released with (get_rope_index of transformers 4.45 and
    4.49, written by the models' authors: "the text start position_ids as the max vision position_ids plus 1"; vLLM's
    M-RoPE the same). Text: one step per token, all three axes alike. A video block of grid (t, h, w), starting at s:
    temporal s + (arange(t) * second_per_grid_t * tokens_per_second).long() (Qwen2-VL: s + arange(t)), height and width
    s + arange(h / merge), s + arange(w / merge); the text after it starts at the block's largest position + 1, temporal
    row included. (transformers 5.23 moves it on by max(h, w) / merge only: other positions once t outruns h and w.)
    An image block (mm_token_type_ids 1, its grid from image_grid_thw) is the same with t = 1 and no time: all its
    temporal positions are s (4.49: second_per_grid_t 0 for images). Padding gets 1, as in the release code (attention
    never reads it). Blocks take each kind's grids in batch order. (B, P) -> (3, B, P)"""
    B, P = mm_token_type_ids.shape
    positions = torch.ones(3, B, P, dtype=torch.long, device=mm_token_type_ids.device)  # (3, B, P)
    video_grid_thw = video_grid_thw if video_grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
    grids = {2: iter(video_grid_thw.tolist()), 1: iter(image_grid_thw.tolist() if image_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.float().cpu() if second_per_grid_ts is not None else [None] * len(video_grid_thw))
    for b in range(B):
        real = attention_mask[b].bool()                                               # (P,)
        types = mm_token_type_ids[b][real].tolist()
        row, start = [], 0
        for kind, run in itertools.groupby(types):  # runs of text (0), image (1) and video (2) tokens
            n = len(list(run))
            if kind == 0:
                row.append(start + torch.arange(n).expand(3, -1))                     # (3, n)
            else:  # an image or a video block
                (t, h, w), second = next(grids[kind]), next(seconds) if kind == 2 else None
                h, w = h // spatial_merge_size, w // spatial_merge_size
                assert t * h * w == n, f"release_positions: {n} vision tokens in row {b} for a grid of {t} x {h} x {w}"
                time = torch.arange(t) if second is None else (torch.arange(t) * second * tokens_per_second).long()  # (t,)
                thw = torch.stack(torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij"))  # (3, t, h, w)
                row.append(start + thw.reshape(3, -1))                                # (3, t*h*w)
            start = int(row[-1].max()) + 1
        positions[:, b, real] = torch.cat(row, dim=1).to(positions.device)
    return positions


def released_rope(model, batch):
    """Qwen2-VL / Qwen2.5-VL: release_positions with the model's merge size and tokens per second. (3, B, P)"""
    vision = hf_model(model).config.vision_config
    return release_positions(batch["mm_token_type_ids"], batch["attention_mask"], grids(batch, "video_grid_thw"), vision.spatial_merge_size,
                             tokens_per_second=getattr(vision, "tokens_per_second", 1), image_grid_thw=grids(batch, "image_grid_thw"),
                             **position_inputs(model, batch))


def own_rope(model, batch):
    """The model's own get_rope_index (Qwen3-VL: each 2-frame group a t = 1 block, where it and the release rule agree).
    (3, B, P)"""
    return hf_model(model).model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=grids(batch, "image_grid_thw"),
                                                video_grid_thw=grids(batch, "video_grid_thw"), attention_mask=batch["attention_mask"],
                                                **position_inputs(model, batch))[0]


def prompt_positions(model, batch):
    """M-RoPE positions of the left-padded prompts (3, B, P), by the family's position function (FAMILIES), and the
    position of the first new token (B,). Every pass takes its positions from here: prefill (and so the decode steps of
    every rollout path), the packed policy pass, the reference pass, eval, data.py --show, the tiny warm start."""
    positions = FAMILIES[model.config.model_type][2](model, batch)                   # (3, B, P)
    return positions, positions.amax(dim=(0, 2)) + 1


def prefill(model, batch, repeats):
    """Run the B prompts once (vision tower included) and repeat their KV cache for G completions each. Returns the
    cache (B*G rows), the next-token logits (B*G, V), the attention mask (B*G, P) and the next position (B*G,).
    `repeats` is G, or one count per prompt (B,) (T-GRPO: G for the normal prompts, fewer for the shuffled ones)."""
    positions, next_pos = prompt_positions(model, batch)                              # (3, B, P), (B,)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                mm_encoder_outputs=vision_features(model, batch), use_cache=True, logits_to_keep=1)
    if not isinstance(repeats, int):
        repeats = torch.as_tensor(repeats, device=batch["input_ids"].device)         # (B,)
    repeat_cache(out.past_key_values, repeats)                                        # (B*G, ...) per layer
    return (out.past_key_values, out.logits[:, -1].repeat_interleave(repeats, dim=0),
            batch["attention_mask"].repeat_interleave(repeats, dim=0), next_pos.repeat_interleave(repeats))


def repeat_cache(cache, repeats):
    """Repeat each prompt's cache rows in place for its completions: the KV layers by transformers' batch_repeat_interleave;
    Qwen3.5's linear-attention layers (a conv state (B, D, k) and a recurrent state (B, H, d_k, d_v), which transformers'
    LinearAttentionLayer does not repeat) by repeat_interleave of each state. repeats: G, or one count per row (B,)."""
    for layer in cache.layers:
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            for i, state in states.items():
                if state is not None:
                    states[i] = state.repeat_interleave(repeats, dim=0)                # (B*G, ...)
        if hasattr(layer, "batch_repeat_interleave"):
            layer.batch_repeat_interleave(repeats)                                    # (B*G, heads, P, d)


def has_linear_attention(model):
    """Whether the language model has linear-attention layers (Qwen3.5's Gated DeltaNet): a recurrent state, no mask."""
    return "linear_attention" in (getattr(hf_model(model).config.text_config, "layer_types", None) or ())


def apply_repetition_penalty(logits, seen_ids, penalty):
    """HF's RepetitionPenaltyLogitsProcessor: the logit of every id in seen_ids (the prompt, padding included, and the
    completion so far, as generate passes them) is divided by penalty when positive, multiplied when negative.
    (N, V), (N, S) -> (N, V)"""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, seen_ids)                                                 # (N, S)
    return logits.scatter(1, seen_ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def generation_repetition_penalty(model_dir):
    """The repetition_penalty of model_dir/generation_config.json (1.05 in the Qwen2-VL / 2.5-VL Instruct files), else 1.0:
    what a plain `model.generate(...)` applies, as Video-R1's first eval script called it."""
    import json
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return 1.0
    with open(path) as f:
        return float(json.load(f).get("repetition_penalty") or 1.0)


COMPILE_ROLLOUT = ("auto", "on", "off")


def rollout_decode(compile_rollout, device):
    """--compile_rollout auto|on|off -> sample_completions' decode: "compiled" when on, or auto on CUDA (where CUDA
    graphs remove the per-token launch overhead), else "eager" (on CPU compiling costs more than a short rollout saves)."""
    if compile_rollout not in COMPILE_ROLLOUT:
        raise ModelError(f"--compile_rollout {compile_rollout!r}: choose one of {COMPILE_ROLLOUT}")
    on = compile_rollout == "on" or (compile_rollout == "auto" and torch.device(device).type == "cuda")
    return "compiled" if on else "eager"


def eager_decoder(model, cache, attention_mask, next_pos):
    """The reference decode: one full model forward per token on the prefill's growing DynamicCache. Returns
    next_logits(token, t): the logits after each row's token t. (B*G, P) mask, (B*G,) positions -> (B*G,), t -> (B*G, V)"""
    def next_logits(token, t):
        nonlocal attention_mask
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.size(0), 1)], dim=1)  # (B*G, P+t+1)
        step_pos = (next_pos + t).view(1, -1, 1).expand(3, -1, 1)                     # (3, B*G, 1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=step_pos,
                    past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float()                                              # (B*G, V)
    return next_logits


@torch.no_grad()
def sample_completions(model, batch, *, num_generations, max_new_tokens, temperature, eos_token_ids,
                       suppress_token_ids, pad_token_id, greedy=False, top_k=0, top_p=1.0, repetition_penalty=1.0,
                       decode="eager"):
    """
    G completions per prompt in one batched generation: the vision tower and the prompt prefill run once per
    prompt, then the KV cache is repeated G times. Returns completion ids (B*G, C), C <= max_new_tokens,
    ordered prompt by prompt; after a row's first EOS come pad tokens. Call with the model in eval mode so
    gradient checkpointing does not switch the cache off. num_generations may be a count per prompt (a list of B):
    then sum(counts) rows. repetition_penalty != 1 (eval's video-r1-first protocol only; the rollout keeps 1.0, as Video-R1's first trainer's
    trainer did) penalises ids of the padded prompt and the completion so far. top_k, top_p: filter_logits after the
    temperature (train passes Video-R1's first trainer's top_k 50; the log-prob passes score the unfiltered distribution).
    decode: "eager" (the reference: one full model forward per token on a growing DynamicCache, eager_decoder), "static"
    (decode.py's decode_step on a preallocated static_cache) or "compiled" (that step under torch.compile, CUDA graphs on
    GPU): the same tokens.
    The token choice (penalty, suppression, filters, sampling) stays eager in all three, so seeded rollouts draw the
    same random numbers.
    """
    cache, logits, attention_mask, next_pos = prefill(model, batch, num_generations)  # logits (B*G, V)
    assert decode in ("eager", "static", "compiled"), f"decode={decode!r}: eager, static or compiled"
    if decode != "eager" and has_linear_attention(model):
        warnings.warn(f"rollout: decode {decode!r} runs eagerly for {model.config.model_type}: the static cache is built "
                      f"for KV layers only, not Gated DeltaNet's conv and recurrent states (docs/models.md)")
        decode = "eager"
    if decode == "eager":
        next_logits = eager_decoder(model, cache, attention_mask, next_pos)
    else:  # the fast path, decode.py: a static KV cache, its step compiled or not
        import decode as fast_decode
        next_logits = fast_decode.static_decoder(model, cache, attention_mask, next_pos, max_new_tokens=max_new_tokens,
                                                 pad_token_id=pad_token_id, compiled=decode == "compiled")
    logits = logits.float()
    never = torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=logits.device)  # once, not every token
    eos = torch.as_tensor(list(eos_token_ids), device=logits.device)
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    tokens = []
    seen = None  # the penalty's ids (B*G, P + t): the padded prompt, then the completion so far
    if repetition_penalty != 1.0:
        counts = num_generations if isinstance(num_generations, int) else torch.as_tensor(num_generations, device=eos.device)
        seen = batch["input_ids"].repeat_interleave(counts, dim=0)
    for t in range(max_new_tokens):
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        logits.index_fill_(1, never, -float("inf"))  # a sampled <|video_pad|> would break the video-token count
        if greedy:
            token = logits.argmax(-1)                                                 # (B*G,)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)  # (B*G, V)
            token = torch.multinomial(probs, 1).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        seen = torch.cat([seen, token[:, None]], 1) if seen is not None else None
        done |= torch.isin(token, eos)
        if done.all() or t == max_new_tokens - 1:  # a host sync per token (docs/performance.md, The rollout's decode)
            break
        logits = next_logits(token, t)                                                # (B*G, V) fp32
    return torch.stack(tokens, dim=1)                                                 # (B*G, C)


def packed_masks(prompt_mask, num_generations, completion_length):
    """
    Boolean masks (True: attend) of rows packed as [prompt | completion 1 | ... | completion G]: the prompt's, causal
    with its left padding hidden (B, 1, P, P); each completion's against [its prompt | itself], the prompt's real
    tokens and its own earlier ones (B*G, 1, C, P+C). A padding query sees itself only: an empty row would be NaN.
    """
    (B, P), G, C, device = prompt_mask.shape, num_generations, completion_length, prompt_mask.device
    real = prompt_mask.bool()                                                          # (B, P)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    prompt = (causal & real[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)  # (B, P, P)
    own = torch.ones(C, C, dtype=torch.bool, device=device).tril().expand(B * G, C, C)
    completion = torch.cat([real.repeat_interleave(G, dim=0)[:, None, :].expand(-1, C, -1), own], dim=2)  # (B*G, C, P+C)
    return prompt[:, None], completion[:, None]


def packed_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, packed=None, **kwargs):
    """The language model's attention: transformers' sdpa, except in the policy pass, which passes `packed` (the masks of
    packed_masks) for rows [prompt | completion 1 | ... | completion G]. Then two sdpa calls: the prompt on itself, and
    the G completions, batched, each on its prompt and itself; no score is computed for a pair a dense (L, L) mask would
    throw away. Without left padding `packed` is just (P, C) and both calls are causal, with no boolean mask.
    query (B, H, L, d), key and value (B, H_kv, L, d) -> (B, L, H, d)"""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    (B, H, L, d), H_kv = query.shape, key.size(1)
    if packed is None and L == 1 and H_kv < H and (attention_mask is None or attention_mask.size(1) == 1):
        # one new token per row (decode): each KV head's query group as its rows, so the cache is read as it is, never
        # expanded to all H heads (transformers' sdpa does that under torch.compile: a copy of the cache per layer)
        out = torch.nn.functional.scaled_dot_product_attention(query.view(B, H_kv, H // H_kv, d), key, value,
                                                               attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
        return out.reshape(B, 1, H, d), None                                          # (B, H_kv, H/H_kv, d) -> (B, 1, H, d)
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    prompt_mask, completion_mask = packed                                              # (B, 1, P, P), (B*G, 1, C, P+C)
    causal = not torch.is_tensor(prompt_mask)  # no left padding: packed = (P, C), causal calls the flash kernel takes
    P, C = packed if causal else (prompt_mask.size(-1), completion_mask.size(-2))
    G = (L - P) // C
    key, value = repeat_kv(key, H // key.size(1)), repeat_kv(value, H // value.size(1))  # (B, H, L, d)

    def completions(t):  # (B, H, L, d) -> (B*G, H, C, d)
        return t[:, :, P:].unflatten(2, (G, C)).transpose(1, 2).flatten(0, 1)

    def after_prompt(t):  # each completion after its prompt: (B*G, H, P+C, d)
        return torch.cat([t[:, :, :P].repeat_interleave(G, dim=0), completions(t)], dim=2)

    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, scale=scaling, dropout_p=dropout)
    if causal:  # the completion block is causal aligned bottom-right: query i sees the prompt and its own first i+1
        from torch.nn.attention.bias import causal_lower_right
        prompt_mask, completion_mask = None, causal_lower_right(C, P + C)
    prompt_out = sdpa(query[:, :, :P], key[:, :, :P], value[:, :, :P], attn_mask=prompt_mask, is_causal=causal)  # (B, H, P, d)
    completion_out = sdpa(completions(query), after_prompt(key), after_prompt(value), attn_mask=completion_mask)  # (B*G, H, C, d)
    completion_out = completion_out.unflatten(0, (B, G)).transpose(1, 2).flatten(2, 3)                      # (B, H, G*C, d)
    return torch.cat([prompt_out, completion_out], dim=2).transpose(1, 2).contiguous(), None


class PromptState:
    """The conv and recurrent states one Gated DeltaNet layer leaves after the prompt, behind the cache methods its
    forward calls (transformers' LinearAttentionLayer's, minus the in-place writes: the states keep their autograd graph,
    and a gradient-checkpointing recompute builds a fresh one). Recording past: a one-token completion takes the same
    path as longer ones (conv state concatenated, never updated in place)."""

    def __init__(self):
        self.conv, self.recurrent = None, None                                         # (N, D, k), (N, H, d_k, d_v)

    def get_conv_state(self, layer_idx, state_idx=0):
        return self.conv

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.recurrent

    def is_recording_past(self, layer_idx):
        return True

    def update_conv_state(self, conv_input, layer_idx, conv_kernel_size, **kwargs):  # (N, D, T) -> (N, D, [k +] T)
        full = conv_input if self.conv is None else torch.cat([self.conv, conv_input], dim=-1)
        self.conv = torch.nn.functional.pad(full, (max(conv_kernel_size - full.size(-1), 0), 0))[..., -conv_kernel_size:]
        return full

    def update_recurrent_state(self, state, layer_idx, **kwargs):
        self.recurrent = state
        return state


def packed_linear_attention(module, forward, hidden_states, cache_params=None, attention_mask=None, packed=None, **kwargs):
    """Qwen3.5's Gated DeltaNet layer (linear attention: a recurrent state, no attention mask) in the policy pass. A mask
    cannot split [prompt | completion 1 | ... | completion G] here: the state would flow from one completion into the
    next. So the prompt runs first, its conv and recurrent states are repeated G times (with grad), and the G
    completions run from them as B*G rows: each starts from its prompt's state, as in the rollout. Without `packed`
    (prefill, decode, the reference pass): transformers' `forward` as it is. (B, L, D) -> (B, L, D)"""
    if packed is None:
        return forward(module, hidden_states, cache_params, attention_mask, **kwargs)
    prompt_mask, completion_mask = packed
    padded = torch.is_tensor(prompt_mask)  # else packed = (P, C): no left padding
    P, C = (prompt_mask.size(-1), completion_mask.size(-2)) if padded else packed
    B, L, D = hidden_states.shape
    G = (L - P) // C
    # left padding: the last prompt query (a real token) sees exactly the real ones; padding is zeroed as transformers does
    real = prompt_mask[:, 0, -1] if padded else None                                   # (B, P)
    state = PromptState()
    prompt_out = forward(module, hidden_states[:, :P], state, real, **kwargs)          # (B, P, D)
    state.conv, state.recurrent = state.conv.repeat_interleave(G, 0), state.recurrent.repeat_interleave(G, 0)  # (B*G, ...)
    completion_out = forward(module, hidden_states[:, P:].reshape(B * G, C, D), state, None, **kwargs)  # (B*G, C, D)
    return torch.cat([prompt_out, completion_out.reshape(B, G * C, D)], dim=1)        # (B, L, D)


def use_packed_attention(model):
    """Register packed_attention with transformers as "packed_sdpa" and put the language model on it; Qwen3.5's linear-
    attention layers run packed_linear_attention."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register("packed_sdpa", packed_attention)
    AttentionMaskInterface.register("packed_sdpa", sdpa_mask)  # outside the packed pass: the masks sdpa gets
    model.set_attn_implementation({"text_config": "packed_sdpa"})
    for module in model.modules():
        if type(module).__name__.endswith("GatedDeltaNet") and not isinstance(module.forward, functools.partial):
            module.forward = functools.partial(packed_linear_attention, module, type(module).forward)
    return model


def completion_logps(model, batch, completion_ids, *, num_generations, temperature, entropy=False):
    """
    Per-token log-probs (B*G, C) of the completions under `model`, grad flowing: the policy pass. Each prompt and its G
    completions are packed into one row, [prompt | completion 1 | ... | completion G], which packed_attention splits
    again, so the video is encoded and the prompt's ~1,200 tokens run once per prompt rather than once per completion:
    B*(P+G*C) positions instead of B*G*(P+C), gradient checkpointing untouched. Every completion gets the M-RoPE
    positions it had in the rollout (starting where its prompt ends). entropy=True: (log-probs, entropies (B*G, C), no grad).
    """
    assert model.config.text_config._attn_implementation == "packed_sdpa", "load with load_model, or use_packed_attention(model)"
    (B, P), G, C = batch["input_ids"].shape, num_generations, completion_ids.size(1)
    positions, next_pos = prompt_positions(model, batch)                              # (3, B, P), (B,)
    completion_pos = (next_pos[:, None] + torch.arange(C, device=next_pos.device)).repeat(1, G)  # (B, G*C)
    positions = torch.cat([positions, completion_pos[None].expand(3, -1, -1)], dim=2)  # (3, B, L)
    input_ids = torch.cat([batch["input_ids"], completion_ids.view(B, G * C)], dim=1)  # (B, L): row b*G+g is completion g of b
    # the positions whose logits predict each completion token: the prompt's last for its first, then its own tokens
    keep = P - 1 + torch.arange(G, device=input_ids.device)[:, None] * C + torch.arange(C, device=input_ids.device)  # (G, C)
    keep[:, 0] = P - 1
    padded = not bool(batch["attention_mask"].all())  # one prompt per GPU: never padded, causal calls (packed_attention)
    out = model(input_ids=input_ids, position_ids=positions, mm_encoder_outputs=vision_features(model, batch),
                packed=packed_masks(batch["attention_mask"], G, C) if padded else (P, C), use_cache=False,
                logits_to_keep=keep.flatten())
    logits = out.logits.view(B * G, C, -1)                                            # (B*G, C, V)
    return selective_log_softmax(logits, completion_ids, temperature, entropy)       # (B*G, C)


@torch.no_grad()
def completion_logps_shared_prompt(model, batch, completion_ids, *, num_generations, temperature):
    """
    completion_logps for the reference pass (no grad), cheaper still: the prompt runs once per prompt
    and the G completions attend to its repeated KV cache, so no attention is spent on masked-out pairs. (The policy
    pass cannot do this: with gradient checkpointing, transformers keeps no KV cache in training mode.) Call with the
    model in eval mode.
    """
    C = completion_ids.size(1)
    cache, first_logits, attention_mask, next_pos = prefill(model, batch, num_generations)  # first_logits (B*G, V)
    positions = (next_pos[:, None] + torch.arange(C, device=next_pos.device))[None].expand(3, -1, -1)  # (3, B*G, C)
    attention_mask = torch.cat([attention_mask, torch.ones_like(completion_ids)], dim=1)  # (B*G, P+C)
    out = model(input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
    logits = torch.cat([first_logits[:, None], out.logits[:, :-1]], dim=1)           # (B*G, C, V)
    return selective_log_softmax(logits, completion_ids, temperature)                 # (B*G, C)


# ----------------------------------------------------------------------------------------------------------------
# loading

# The families this trainer runs, by config.json's model_type: (transformers class, batch entries its M-RoPE needs, its
# position function: docs/positions.md).
# Everything else that differs is inside transformers: Qwen2.5-VL's vision tower has window attention (full attention
# in a few blocks), RMSNorm and a SwiGLU MLP; its video positions count time, not frames: a temporal patch advances the
# position by tokens_per_second * second_per_grid_ts (= temporal_patch_size / sample fps, made per video by data.py).
# The video processor settings (patch 14, merge 2, CLIP mean/std) are the same in both published checkpoints.
FAMILIES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", (), released_rope),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", ("second_per_grid_ts",), released_rope),
    # Qwen3-VL: 16-px patches and mean/std 0.5 (its preprocessor configs, read by data.py), a timestamp before each
    # 2-frame group (data.VideoSettings.frame_timestamps), interleaved M-RoPE with each group its own t = 1 grid (its
    # get_rope_index), DeepStack (vision features added after the first decoder layers: vision_features keeps them),
    # QK-norm (inside its attention layer, which still calls packed_attention)
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", (), own_rope),
    # Qwen3.5: Qwen3-VL's tower without DeepStack, its processor, timestamps and get_rope_index; a hybrid text stack, three
    # Gated DeltaNet (linear attention) layers per gated full-attention one: the policy pass runs them from the prompt's
    # state (packed_linear_attention), prefill repeats their states (repeat_cache), the rollout decodes eagerly
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", (), own_rope),
}


def model_family(model_dir):
    """config.json's model_type, if this trainer runs it; else ModelError naming what was found (no weights read)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelError(f"{model_dir}: no config.json, not a Hugging Face model folder")
    with open(path) as f:
        found = json.load(f).get("model_type")
    if found not in FAMILIES:
        raise ModelError(f"{path}: model_type {found!r} is not supported; supported: {', '.join(FAMILIES)} "
                         f"(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5)")
    return found

def is_hub_id(name):
    """Shaped like a hub id ("Qwen/Qwen2-VL-7B-Instruct") and not a path under a local folder ("runs/nope", when runs/
    exists, is a missing run, not a hub id)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not os.path.isdir(name.split("/")[0])


def check_model_path(name, flag="--model_name_or_path", tiny=False):
    """The model-path rule of train.py and eval.py, in their flag checks and their setup alike: `name` is a folder, a
    hub id (resolve_model_dir downloads it), or under --tiny (tiny=True) a tiny model's own folder data/tiny-<name> of
    tiny.TINY_MODELS, built there on first use. Anything else is a ModelError naming `flag`, and nothing is created: a
    mistyped folder never becomes a fresh random model. Returns the tiny family to build at `name`, else None."""
    from tiny import TINY_MODELS
    tiny_dirs = {os.path.join("data", f"tiny-{tiny_name}"): family for tiny_name, family in TINY_MODELS.items()}
    for tiny_dir, family in tiny_dirs.items():
        if tiny and os.path.abspath(name) == os.path.abspath(tiny_dir):
            return family
    if os.path.isdir(name) or is_hub_id(name):
        return None
    raise ModelError(f"{flag} {name}: no such folder (nor a hub id like Qwen/Qwen2-VL-7B-Instruct). Download one with "
                     f"`hf download Qwen/Qwen2-VL-7B-Instruct --local-dir DIR`, or " +
                     (f"leave {flag} out: --tiny builds its model only in its own folder ({', '.join(tiny_dirs)})" if tiny
                      else "try the offline demo: --tiny"))


def resolve_model_dir(name, flag="--model_name_or_path"):
    """A local folder as is; a hub id is downloaded once into the HF cache (then read from disk). A path that is no
    folder (check_model_path), or a failed download, is a ModelError naming `flag` (eval.py: --model)."""
    if os.path.isdir(name):
        return name
    check_model_path(name, flag)
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name)
    except Exception as e:  # offline, unknown id, no access: say what to do instead of a hub traceback
        raise ModelError(f"{flag} {name}: not a local folder and the hub download failed ({type(e).__name__}). "
                         f"Download it where the hub is reachable (`hf download {name} --local-dir DIR`) "
                         f"and pass the folder, or try the offline demo: python train.py --tiny") from e


def checkpoint_activations(model):
    """Gradient checkpointing, non-reentrant: activation_checkpointing_enable (transformers 5.23), or the older
    name it replaces (a GPU node's transformers 5.17: docs/gpu.md)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def weight_decay_groups(model, weight_decay):
    """The trainable parameters in two AdamW groups, as the HF Trainer behind Video-R1 splits them: weight decay for
    matrices (linear, embedding, conv), none for biases and norm weights (here: every parameter of fewer than 2
    dims, which also covers RMSNorms the Trainer's name patterns miss, e.g. Qwen2.5-VL's vision norm1/norm2).
    Under ZeRO-3 a partitioned parameter's shape is its ds_shape."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_model(model_dir, *, bf16, attn_implementation="auto", device=None):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 (model_family) from a local folder. The vision tower runs `attn_implementation` ('auto' =
    flash_attention_2 when it imports, on CUDA, in bf16, else sdpa); the language model runs packed_attention (sdpa,
    split for the packed policy pass)."""
    import transformers
    model_class = getattr(transformers, FAMILIES[model_family(model_dir)][0])
    dtype = torch.bfloat16 if bf16 else torch.float32
    return use_packed_attention(model_class.from_pretrained(model_dir, dtype=dtype, attn_implementation={
        "text_config": "sdpa", "vision_config": vision_attention(attn_implementation, device, bf16=bf16)}))


_ZERO3_LOAD_CONFIG = None  # transformers holds only a weak reference to it


def partition_at_load(ds_config):
    """Under ZeRO-3, have transformers build every model from_pretrained loads from now on inside deepspeed.zero.Init
    (its HfDeepSpeedConfig): each rank materialises only its shard of the weights, never a whole copy per rank."""
    global _ZERO3_LOAD_CONFIG
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        _ZERO3_LOAD_CONFIG = HfDeepSpeedConfig(ds_config)


def flash_attn_error():
    """None when flash_attn imports, else why not: found on disk is not enough (a wheel built for another torch or
    CUDA fails only when imported, with an ImportError or OSError of an undefined symbol)."""
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, OSError (.so), RuntimeError (CUDA): every one means "cannot use it"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def vision_attention(attn_implementation, device, bf16=True):
    """'auto' -> flash_attention_2 when flash_attn imports, the device is CUDA and the weights are bf16 (flash-attn has
    no fp32 kernel), else sdpa. An explicit flash_attention_2 that cannot run is a ModelError naming the fix."""
    if attn_implementation == "flash_attention_2":
        if not bf16:
            raise ModelError("--attn_implementation flash_attention_2 needs bf16 (flash-attn has no fp32 kernel): drop --no-bf16, or use sdpa")
        error = flash_attn_error()
        if error:
            raise ModelError(f"--attn_implementation flash_attention_2: flash_attn does not import ({error}); install a build "
                             f"for this torch (pip install -r requirements-gpu.txt --no-build-isolation) or use --attn_implementation sdpa")
    if attn_implementation != "auto":
        return attn_implementation
    cuda = device is not None and torch.device(device).type == "cuda"
    return "flash_attention_2" if cuda and bf16 and flash_attn_error() is None else "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# LoRA

# the language model's attention and MLP projections, as module-name suffixes (Qwen2-VL and Qwen2.5-VL alike)
LORA_DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# and with linear-attention layers (Qwen3.5's Gated DeltaNet) their q/k/v, output-gate and output projections; not the
# per-head decay and beta inputs in_proj_a / in_proj_b (16-48 rows each: a rank-16 adapter would be as large as the matrix)
LORA_LINEAR_ATTENTION_TARGETS = "in_proj_qkv,in_proj_z,out_proj"


def lora_targets(model, target_modules):
    """Full names of the Linear modules LoRA adapts: each comma-separated name of `target_modules` matches the language
    model's modules ending in it; a name starting with "visual." matches in the vision tower instead (frozen unless
    asked: Qwen2.5-VL's vision MLP has gate/up/down_proj too). A name matching nothing: ModelError listing the names."""
    linear = [n for n, m in hf_model(model).named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n]
    names, unknown = [], []
    default = LORA_DEFAULT_TARGETS + ("," + LORA_LINEAR_ATTENTION_TARGETS if has_linear_attention(model) else "")
    for target in [t.strip() for t in (target_modules or default).split(",") if t.strip()]:
        where, suffix = ("visual.", target[len("visual."):]) if target.startswith("visual.") else ("language_model.", target)
        found = [n for n in linear if where in n and n.endswith("." + suffix)]
        names += found
        unknown += [] if found else [target]
    if unknown:
        known = lambda part: sorted({n.rsplit(".", 1)[-1] for n in linear if part in n})
        raise ModelError(f"--lora_target_modules: {unknown} match no Linear module; the language model has "
                         f"{known('language_model.')}, the vision tower (prefix 'visual.') {known('visual.')}")
    return names


def meta_model(model_dir):
    """The folder's architecture on the meta device: no weights read, no memory; enough for its config and for
    get_rope_index (data.py --show prints the positions the model computes)."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return getattr(transformers, FAMILIES[model_family(model_dir)][0])._from_config(config)


def check_lora_targets(model_dir, target_modules):
    """lora_targets on the folder's architecture built on the meta device: the error comes before any weights load."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = getattr(transformers, FAMILIES[model_family(model_dir)][0])._from_config(config)
    return lora_targets(skeleton, target_modules)


def add_lora(model, *, rank, alpha, target_modules):
    """Wrap the policy in peft LoRA adapters of rank `rank` on lora_targets; only the adapters train. The reference is
    then the same weights with the adapters off (`reference`), no second model."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(model, target_modules))
    return get_peft_model(model, config)


@contextlib.contextmanager
def reference(policy, ref_engine):
    """The reference model for the KL: the frozen copy's engine if there is one, else (LoRA) the policy with its
    adapters disabled, i.e. the base weights exactly."""
    if ref_engine is not None:
        yield ref_engine.module
    else:
        with policy.disable_adapter():
            yield policy


def gathered_params(engine):
    """Under ZeRO-3, gather the full weights once for the whole rollout (and lift the per-module fetch hooks)
    rather than once per generated token; ranks may then take different numbers of decoding steps."""
    if engine.zero_optimization_stage() == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
        return unwrap_model_for_generation(engine)
    return contextlib.nullcontext()

