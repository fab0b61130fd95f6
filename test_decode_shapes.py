"""
The compiled rollout's shapes, caches and attention (decode.decode_shape, static_cache, pick_decode_step,
packed_attention's single-token path), and the collective timeout the compile stalls need. CPU, the tiny Qwen2-VL;
each compiled case starts with dynamo's caches empty.
"""
import datetime
import functools
import warnings

import pytest
import torch

import decode as decode_lib
import runtime
from decode import decode_shape, decode_step, static_cache
from model import packed_attention, prefill, sample_completions
from test_grpo import tiny_setup  # noqa: F401  (the fixture: tiny model, two left-padded prompts)

one_family = pytest.mark.parametrize("tiny_setup", ["qwen2_vl"], indirect=True)  # the decode is the same in all three


@pytest.fixture
def fresh_decode():
    """dynamo's caches, the kept static caches and the decode shapes empty before and after."""
    decode_lib.release_decode_caches()
    yield
    decode_lib.release_decode_caches()


def kwargs(tokenizer, eos, suppress, **kw):
    return dict(dict(max_new_tokens=4, temperature=1.0, eos_token_ids=eos, suppress_token_ids=suppress,
                     pad_token_id=tokenizer.pad_token_id, greedy=True), **kw)


def test_decode_shape_buckets():
    assert [decode_shape(n, 300)[0] for n in (1, 2, 3, 4, 5, 8, 9, 24)] == [1, 2, 4, 4, 8, 8, 16, 32]
    assert [decode_shape(8, w)[1] for w in (1, 256, 257, 512, 513, 1300, 2048, 2049)] == [256, 256, 512, 512, 1024,
                                                                                        2048, 2048, 4096]


@one_family
def test_more_decode_shapes_than_the_recompile_limit(tiny_setup, fresh_decode, monkeypatch):
    # rows 2, 4, 8 (6 padded): three shapes against a recompile limit of 1 (past it dynamo raises
    # FailOnRecompileLimitHit under fullgraph): the rollout goes on eagerly, with one warning and the eager tokens
    from torch._dynamo.utils import counters
    tokenizer, model, batch, eos, suppress = tiny_setup
    with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("always")
        for G in (1, 2, 3):
            kw = kwargs(tokenizer, eos, suppress, num_generations=G)
            assert torch.equal(sample_completions(model, batch, decode="compiled", **kw), sample_completions(model, batch, **kw))
    assert [v for _, v in sorted(decode_lib.STATE.shapes.items())] == ["compiled", "eager", "eager"]
    assert len([w for w in caught if "runs eagerly" in str(w.message)]) == 1, [str(w.message) for w in caught]
    # past COMPILED_SHAPES_MAX a new shape (16 rows) is not compiled at all: no compile time, dynamo's limit not reached
    monkeypatch.setattr(decode_lib, "COMPILED_SHAPES_MAX", 1)
    graphs, kw = counters["stats"]["unique_graphs"], kwargs(tokenizer, eos, suppress, num_generations=5)
    assert torch.equal(sample_completions(model, batch, decode="compiled", **kw), sample_completions(model, batch, **kw))
    assert decode_lib.STATE.shapes[(16, 256)] == "eager" and counters["stats"]["unique_graphs"] == graphs


@one_family
def test_static_caches_and_graphs_stay_bounded_over_rollouts(tiny_setup, fresh_decode):
    # rollouts of one shape reuse one cache (same addresses: one CUDA graph replays in all of them) and one compiled
    # graph; the other prompt (shorter, same width bucket) on the reused cache gives the eager tokens (zeroed between)
    from torch._dynamo.utils import counters
    tokenizer, model, batch, eos, suppress = tiny_setup
    short = {k: v[1:] if torch.is_tensor(v) and v.size(0) == 2 else v for k, v in batch.items()}
    short.update(pixel_values_videos=batch["pixel_values_videos"][64:], video_grid_thw=batch["video_grid_thw"][1:],
                 input_ids=batch["input_ids"][1:, batch["attention_mask"][1].argmax():])
    short.update(attention_mask=torch.ones_like(short["input_ids"]), mm_token_type_ids=short["mm_token_type_ids"][:, -short["input_ids"].size(1):])
    graphs, addresses = counters["stats"]["unique_graphs"], set()
    for b, G in ((batch, 2), (short, 4), (batch, 2), (short, 4), (batch, 2)):  # 4 rows each
        kw = kwargs(tokenizer, eos, suppress, num_generations=G, greedy=False)
        torch.manual_seed(1)
        ids = sample_completions(model, b, decode="compiled", **kw)
        torch.manual_seed(1)
        assert torch.equal(ids, sample_completions(model, b, **kw))
        assert len(decode_lib.STATE.caches) == 1
        addresses.add(next(iter(decode_lib.STATE.caches.values())).layers[0].keys.data_ptr())
    assert len(addresses) == 1 and counters["stats"]["unique_graphs"] == graphs + 1
    for G in (1, 2, 3, 5, 9, 1, 2, 3, 5, 9):  # more shapes than are compiled: at most COMPILED_SHAPES_MAX caches alive
        sample_completions(model, batch, decode="static", **kwargs(tokenizer, eos, suppress, num_generations=G))
        assert len(decode_lib.STATE.caches) <= decode_lib.COMPILED_SHAPES_MAX
    assert decode_lib.decode_state("cpu")["cuda_graphs"] is None


@one_family
def test_rotating_shapes_allocate_one_cache_each_and_never_reset(tiny_setup, fresh_decode, monkeypatch):
    # three decode shapes in rotation over 18 rollouts (as batch remainders and per-prompt counts make them): one static
    # cache allocated per shape, kept, so on CUDA each shape's graph replays. A CUDA graph counter stands in for CUDA's,
    # counting one recording per new cache address as cudagraph trees would; with fewer caches kept than shapes every
    # rollout allocates, the count passes CUDA_GRAPHS_MAX and everything compiled is released (minutes per shape at 7B).
    # The compiled step is decode_step itself here: pick_decode_step's bookkeeping runs, no compile time is spent.
    import transformers
    allocations, resets = [], []

    class CountedStaticCache(transformers.StaticCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            allocations.append(kw["max_cache_len"])

    monkeypatch.setattr(transformers, "StaticCache", CountedStaticCache)
    monkeypatch.setattr(decode_lib, "cuda_graph_count", lambda device: len(allocations))
    monkeypatch.setattr(decode_lib, "compiled_decode_step", functools.cache(lambda mode: decode_step))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    tokenizer, model, batch, eos, suppress = tiny_setup
    rows = set()
    for _ in range(6):
        for G in (1, 2, 3):  # 2, 4 and 8 rows (6 padded to 8)
            kw = kwargs(tokenizer, eos, suppress, num_generations=G)
            assert torch.equal(sample_completions(model, batch, decode="compiled", **kw), sample_completions(model, batch, **kw))
            rows.add(decode_lib.decode_shape(2 * G, 0)[0])
    assert len(allocations) == len(rows) == 3, f"{len(allocations)} static caches allocated for {len(rows)} shapes"
    assert not resets and set(decode_lib.STATE.shapes.values()) == {"compiled"}, decode_lib.decode_state("cpu")


@pytest.mark.torch_api
def test_private_torch_apis_the_fast_decode_uses():
    # the supported torch range is 2.11 (a GPU node's) to 2.13 (pinned); the fast decode leans on private names, read
    # in 2.11's and 2.13's sources alike (docs/gpu.md): each one, as decode.py and the GPU tests call it
    import inspect
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees
    assert isinstance(counters["stats"]["unique_graphs"], int) and isinstance(counters["inductor"]["cudagraph_skips"], int)
    assert issubclass(torch._dynamo.exc.FailOnRecompileLimitHit, Exception) and torch._dynamo.config.recompile_limit == 8
    assert "create_if_none_exists" in inspect.signature(cudagraph_trees.get_manager).parameters
    assert callable(cudagraph_trees.CUDAGraphTreeManager.get_roots)
    assert "self.children" in inspect.getsource(cudagraph_trees.CUDAGraphNode.__init__)  # {function id: [nodes]}
    assert callable(torch._dynamo.reset) and callable(torch.compiler.cudagraph_mark_step_begin)
    assert (2, 11) <= tuple(int(v) for v in torch.__version__.split(".")[:2]) <= (2, 13), torch.__version__


@one_family
def test_memory_estimate_counts_the_kept_static_cache(tiny_setup, fresh_decode):
    # bench.memory_per_gpu's term against the bytes of the cache static_cache keeps: 6 rows padded to 8, the prompt
    # and 40 new tokens padded to 256 x 2^k positions (fp32 here: 4 bytes)
    import bench
    tokenizer, model, batch, eos, suppress = tiny_setup
    (B, P), G, C = batch["input_ids"].shape, 3, 40
    static = static_cache(model, prefill(model, batch, G)[0], C)
    kept = sum(t.nbytes for layer in static.layers for t in (layer.keys, layer.values))
    assert static.layers[0].keys.size(0) == 8 and decode_lib.STATE.caches
    terms = bench.memory_per_gpu(model, world=1, lora_rank=0, B=B, G=G, P=P, C=C, bytes_per=4)
    assert terms["static KV caches kept (compiled rollout)"] * 2**30 == kept
    assert bench.memory_per_gpu(model, world=1, lora_rank=0, B=B, G=G, P=P, C=C, decode_caches=0)[
        "static KV caches kept (compiled rollout)"] == 0


def test_single_token_attention_equals_the_repeated_heads():
    # the grouped-query layout against sdpa on K and V repeated to every query head, with a padding mask
    from transformers.integrations.sdpa_attention import repeat_kv
    torch.manual_seed(0)
    B, H, H_kv, L, d = 3, 8, 2, 40, 16
    query, key, value = torch.randn(B, H, 1, d), torch.randn(B, H_kv, L, d), torch.randn(B, H_kv, L, d)
    mask = torch.rand(B, 1, 1, L) > 0.3
    mask[..., 0] = True
    ours, _ = packed_attention(None, query, key, value, mask, scaling=0.3)              # (B, 1, H, d)
    ref = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask,
                                                           scale=0.3).transpose(1, 2)  # (B, 1, H, d)
    torch.testing.assert_close(ours, ref)


@one_family
def test_compiled_decode_graph_does_not_expand_the_cache(tiny_setup, fresh_decode):
    # the graph torch.compile captures of the decode step (a backend that keeps dynamo's FX graph): no tensor in it is
    # larger than one layer's K cache, so no K or V is expanded to all query heads over the cache width
    tokenizer, model, batch, eos, suppress = tiny_setup
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cache, logits, mask, next_pos = prefill(model, batch, 2)
    static = static_cache(model, cache, 4)
    keys = static.layers[0].keys                                                           # (R, H_kv, L, d)
    assert keys.size(1) < model.config.text_config.num_attention_heads, "the tiny model must have grouped-query attention"
    mask = torch.nn.functional.pad(mask, (0, keys.size(2) - mask.size(1)), value=1)      # (R, L)
    with torch.no_grad():
        out = torch.compile(decode_step, backend=keep_graph, fullgraph=True)(model, logits.argmax(-1), next_pos, mask, static)
    assert len(graphs) == 1 and out.shape == logits.shape
    sizes = [(n.name, tuple(v.shape)) for n in graphs[0].graph.nodes
             for v in [n.meta.get("example_value")] if isinstance(v, torch.Tensor) and keys.size(2) in v.shape]
    assert sizes, "the graph should read the cache"
    too_big = [(name, shape) for name, shape in sizes if torch.Size(shape).numel() > keys.numel()]
    assert not too_big, f"the cache expanded to all query heads: {too_big}"


def test_process_groups_wait_for_a_compile(monkeypatch):
    # a rank compiling a new decode shape keeps the others waiting in the next collective: longer than NCCL's 10 min
    import deepspeed
    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(train=kw))
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **kw: None)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: seen.update(eval=kw))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    runtime.init_distributed()                     # train.py's
    runtime.init_distributed(use_deepspeed=False)  # eval.py's
    assert seen["train"]["timeout"] == seen["eval"]["timeout"] == runtime.DIST_TIMEOUT >= datetime.timedelta(minutes=30)
