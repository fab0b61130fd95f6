"""
The rollout's fast decode: the decode loop's step on a static KV cache, eager or under torch.compile (CUDA graphs on a
GPU). model.sample_completions reads the plain loop in one screen and calls this file through one function,
static_decoder, for decode="static" or "compiled"; without this file the eager loop alone remains.

    static_decoder(model, cache, ...)  -> next_logits(token, t): the prefill's cache copied into a static one, then one
                                          decode_step (compiled or not) per token; the same tokens as the eager loop
    decode_step(model, token, ...)     -> one token's logits on the static cache: the language model and the LM head
    STATE                              -> what is kept across rollouts (static caches and compiled steps, per shape)
    release_decode_caches()            -> drop it all, dynamo's compiled graphs included

docs/performance.md, The rollout's decode, says why each bound is what it is.
"""
import warnings

import torch

from model import hf_model


COMPILED_SHAPES_MAX = 6  # distinct (rows, width) decode shapes compiled; dynamo's recompile limit is 8 (an error under fullgraph);
                         # also the static caches kept alive across rollouts, one per compiled shape: stable addresses, so
                         # each shape's CUDA graph replays, never re-records (bench.memory_per_gpu counts them)
CUDA_GRAPHS_MAX = 16     # recorded CUDA graphs (each token checks them in turn) before all are released and recompiled


class DecodeState:
    """What the fast decode keeps across rollouts, in one place (one per process: STATE)."""

    def __init__(self):
        self.caches = {}    # (rows, width) -> StaticCache, most recently used last
        self.shapes = {}    # (rows, width) -> "compiled" | "eager": which step decodes it
        self.compiled = {}  # torch.compile mode -> decode_step compiled in that mode

    def release(self):
        """Drop the kept static caches, the compiled decode step and its CUDA graphs (torch._dynamo.reset: the next
        compiled rollout compiles again)."""
        self.caches.clear()
        self.shapes.clear()
        self.compiled.clear()
        torch._dynamo.reset()

    def report(self, device):
        """What the compiled decode holds, for bench.py, train.py's last line and the GPU tests."""
        return {"decode_caches": [f"{r}x{w}" for r, w in self.caches], "cuda_graphs": cuda_graph_count(device),
                "decode_shapes": {f"{r}x{w}": how for (r, w), how in sorted(self.shapes.items())}}  # rows x width


STATE = DecodeState()


def decode_shape(rows, width, bucket=256):
    """The static cache's (rows, width) for `rows` completions and `width` = prompt + max_new_tokens positions: rows
    padded up to a power of 2, width up to 256 x 2^k. Every distinct shape is one more compiled graph (and CUDA graph):
    this keeps them few when prompt lengths, batch remainders or per-prompt counts vary."""
    return 1 << (rows - 1).bit_length(), bucket << (-(-width // bucket) - 1).bit_length()


def static_cache(model, cache, max_new_tokens):
    """The prefill's DynamicCache (N rows, P positions) copied into a transformers StaticCache of decode_shape(N,
    P + max_new_tokens), rows past N zero: every decode step then reads and writes tensors of the same shapes at the same
    addresses (what torch.compile needs to capture the step whole, and CUDA graphs to replay it). One cache per shape
    stays alive, up to COMPILED_SHAPES_MAX, and is zeroed and reused by the next rollout of its shape, so a CUDA graph
    recorded on it replays in every later rollout (a new cache would be a new address: a new recording, kept). Past
    that bound the least recently used cache of a shape that is not compiled goes first (an eager shape's, or this
    rollout's own when it will decode eagerly), so the compiled shapes' caches are never dropped."""
    from transformers import StaticCache
    (N, H, P, _), layers = cache.layers[0].keys.shape, cache.layers
    key = decode_shape(N, P + max_new_tokens)
    static = STATE.caches.pop(key, None)
    if static is None or len(static.layers) != len(layers) or any(  # another model: other layers, heads or dtype
            s.keys.shape[1] != p.keys.shape[1] or s.keys.dtype != p.keys.dtype or s.keys.device != p.keys.device
            for s, p in zip(static.layers, layers)):
        static = StaticCache(config=model.config, max_cache_len=key[1])
        for layer, prefilled in zip(static.layers, layers):
            layer.lazy_initialization(prefilled.keys.new_empty(key[0], H, 1, prefilled.keys.size(-1)),
                                      prefilled.values.new_empty(key[0], H, 1, prefilled.values.size(-1)))  # (R, H, L, d)
    STATE.caches[key] = static
    while len(STATE.caches) > COMPILED_SHAPES_MAX:
        uncompiled = [k for k in STATE.caches if STATE.shapes.get(k) != "compiled"]
        STATE.caches.pop(uncompiled[0] if uncompiled else next(iter(STATE.caches)))
    for layer, prefilled in zip(static.layers, layers):
        layer.keys.zero_()
        layer.values.zero_()
        layer.keys[:N, :, :P].copy_(prefilled.keys)
        layer.values[:N, :, :P].copy_(prefilled.values)
        layer.cumulative_length.fill_(P)  # a tensor: the write position advances on the device, no recompile
    return static


def release_decode_caches():
    """STATE.release(): every static cache, compiled step and CUDA graph the fast decode keeps."""
    STATE.release()


def cuda_graph_count(device):
    """CUDA graphs cudagraph trees hold on `device` (recorded and kept until released), or None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    from torch._inductor.cudagraph_trees import get_manager
    manager = get_manager(torch.device(device).index or 0, create_if_none_exists=False)
    nodes, count = list(manager.get_roots()) if manager is not None else [], 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes += [child for children in node.children.values() for child in children]
    return count


def decode_state(device):
    """STATE.report(device): the kept caches, the shapes and how each decodes, the CUDA graphs."""
    return STATE.report(device)


def decode_step(model, token, position, attention_mask, cache):
    """One new token per row on the static cache: the language model and the LM head only (a text token needs no
    vision), positions plain text positions (next_pos + t, the same in all three M-RoPE axes). Fixed shapes from token
    to token and no Python branch on tensor values, so torch.compile captures it whole (fullgraph). The mask is the
    cache's full (N, L) width: the unwritten tail is hidden by the causal mask at the cache's write position.
    (N,), (N,), (N, L) -> (N, V) fp32"""
    net = hf_model(model)  # under LoRA the adapters sit inside its Linear layers
    out = net.model.language_model(input_ids=token[:, None], attention_mask=attention_mask, past_key_values=cache,
                                   position_ids=position.view(1, -1, 1).expand(3, -1, 1), use_cache=True)
    return net.lm_head(out.last_hidden_state[:, -1]).float()


def compiled_decode_step(mode):
    """decode_step under torch.compile, built once per mode ("reduce-overhead": CUDA graphs, on GPU; "default" on CPU)
    and kept in STATE. The weights are graph inputs, read at each call (dynamo inlines nn.Modules and lifts
    parameters): an in-place update, or ZeRO-3's gather that swaps p.data, is seen by the next step, never a copy taken
    at compile time."""
    if mode not in STATE.compiled:
        STATE.compiled[mode] = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return STATE.compiled[mode]


def pick_decode_step(shape, device, eager_because=None):
    """The compiled decode step for a static cache of `shape` (rows, width), while at most COMPILED_SHAPES_MAX shapes
    are compiled; past that, or once dynamo refuses (`eager_because`), decode_step uncompiled: never an error, one
    warning. On CUDA, past CUDA_GRAPHS_MAX recorded graphs (new weight addresses, as ZeRO-3's gather may make, record
    again) everything is released and compiled anew."""
    graphs = cuda_graph_count(device)  # None off CUDA
    if graphs is not None and graphs > CUDA_GRAPHS_MAX:
        warnings.warn(f"{graphs} CUDA graphs recorded for the decode step (> CUDA_GRAPHS_MAX "
                      f"{CUDA_GRAPHS_MAX}): released, the step compiles again")
        release_decode_caches()
    compiled = [k for k, v in STATE.shapes.items() if v == "compiled"]
    if eager_because is None and shape not in STATE.shapes and len(compiled) >= COMPILED_SHAPES_MAX:
        eager_because = f"{len(compiled)} decode shapes are compiled already (COMPILED_SHAPES_MAX)"
    if eager_because is not None:
        if "eager" not in STATE.shapes.values():
            warnings.warn(f"compiled rollout: decode shape {shape} (rows, cache width) runs eagerly from now on: {eager_because}")
        STATE.shapes[shape] = "eager"
    STATE.shapes.setdefault(shape, "compiled")
    if STATE.shapes[shape] == "eager":
        return decode_step
    return compiled_decode_step("reduce-overhead" if torch.device(device).type == "cuda" else "default")


def static_decoder(model, cache, attention_mask, next_pos, *, max_new_tokens, pad_token_id, compiled):
    """sample_completions' fast path. The prefill's cache (N rows) goes into a static_cache of R >= N rows and L
    positions; returns next_logits(token, t): the logits after each row's token t, by decode_step, compiled (or eager
    per pick_decode_step) when `compiled`. The padding rows decode alongside and are never sampled.
    (N, P) mask, (N,) next positions -> next_logits: (N,), t -> (N, V) fp32"""
    N = attention_mask.size(0)
    cache = static_cache(model, cache, max_new_tokens)
    R, L = cache.layers[0].keys.shape[0], cache.layers[0].max_cache_len  # rows padded to R: zero cache, never sampled
    attention_mask = torch.nn.functional.pad(attention_mask, (0, L - attention_mask.size(1), 0, R - N), value=1)  # (R, L)
    next_pos = torch.nn.functional.pad(next_pos, (0, R - N))                          # (R,)
    step = pick_decode_step((R, L), attention_mask.device) if compiled else decode_step

    def next_logits(token, t):
        nonlocal step
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's logits are used up, reuse their memory
        args = (model, torch.nn.functional.pad(token, (0, R - N), value=pad_token_id), next_pos + t, attention_mask, cache)
        try:
            return step(*args)[:N]                                                    # (N, V)
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before the step runs: the cache is untouched
            step = pick_decode_step((R, L), token.device, eager_because="dynamo's recompile limit was hit")
            return step(*args)[:N]
    return next_logits
