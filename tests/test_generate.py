"""A compressed causal LM is still a Hugging Face model: generate() (with the KV-cache graph) and lm-eval."""

import sys
import warnings

import pytest
import torch

import fxslice
from conftest import word_tokenizer
from fxslice import fuse_norm, rotate, slice
from hf_zoo import tiny_model

CALIBRATION = [{"input_ids": torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(i))} for i in range(2)]


def compressed(name="llama", dtype=torch.float64, passes=(fuse_norm, rotate, slice(0.25))):
    model = tiny_model(name, dtype)
    model.generation_config.eos_token_id = None  # generate the full length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, fxslice.compile(model, list(passes), calibration=CALIBRATION)


def argmax_chain(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_generate_is_the_argmax_chain_of_its_own_logits(name):
    _, sliced = compressed(name)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    out = sliced.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, argmax_chain(sliced, ids, 10))
    assert [d is not None for (batch, _, _), d in sliced.decoders.items() if batch == 1] == [True], \
        "generate did not use the KV-cache decoding graph"


def test_generate_with_left_padding_and_a_batch():
    _, sliced = compressed()
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = sliced.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row in range(2):  # each row as if alone and unpadded
        alone = ids[row : row + 1, mask[row].bool()]
        assert torch.equal(out[row, -5:], argmax_chain(sliced, alone, 5)[0, -5:])


def test_generate_matches_the_original_when_nothing_is_sliced():
    model, rotated = compressed(passes=(fuse_norm, rotate))
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(rotated.generate(ids, max_new_tokens=8, do_sample=False), expected)


def test_model_keeps_config_device_dtype_and_counts_parameters():
    model, sliced = compressed()
    assert sliced.config is model.config and sliced.device.type == "cpu" and sliced.dtype == torch.float64
    assert sliced.num_parameters() == fxslice.report(sliced)["parameters"]["after"]
    assert sliced.eval() is sliced  # lm-eval calls eval(); the graph is always in eval mode


def test_lm_eval_hflm_scores_like_the_original():
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = word_tokenizer(128)
    model, rotated = compressed(passes=(fuse_norm, rotate))
    model.config.eos_token_id = rotated.config.eos_token_id = 1
    requests = [Instance("loglikelihood", {}, ("the cat", " of the"), 0),
                Instance("loglikelihood", {}, ("in a", " new"), 1)]
    generation = [Instance("generate_until", {}, ("the first", {"until": ["<eos>"], "max_gen_toks": 6}), 0)]
    results = {}
    for name, m in (("original", model), ("fxslice", rotated)):
        lm = HFLM(pretrained=m, tokenizer=tokenizer, batch_size=2)
        results[name] = (lm.loglikelihood(requests), lm.generate_until(generation))
    for (a, _), (b, _) in zip(results["original"][0], results["fxslice"][0]):
        assert a == pytest.approx(b, abs=1e-6)
    assert results["original"][1] == results["fxslice"][1]
    assert lm_eval is not None


def census_model(name, dtype=torch.float64, **text_config):
    """A tiny model of any causal-LM type (the census's factory), with text-config fields overridden."""
    from zoo_configs import tiny_config
    from zoo_configs import tiny_model as any_tiny_model

    config = tiny_config(name)
    for key, value in text_config.items():
        setattr(config.get_text_config(), key, value)
    model = any_tiny_model(name, dtype, config=config)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("name, overrides", [
    ("mistral", {"sliding_window": 3}),  # every layer slides; the window is shorter than the text
    ("gemma2", {"sliding_window": 3}),  # sliding and full layers alternate
    ("deepseek_v2", {"dtype": torch.float32}),  # latent attention: keys and values of different widths
    ("bloom", {}),  # ALiBi position biases built from the attention mask
    ("rembert", {}),  # position ids read from a buffer while the cache is allocated
    ("roberta-prelayernorm", {}),  # positions start after the padding index: the model derives its own
], ids=["sliding", "alternating", "latent", "alibi", "position-buffer", "own-positions"])
def test_cached_decoding_follows_the_models_own_attention(name, overrides):
    """(Mixtures of experts among them have no float64 kernels: those run in float32.)"""
    model = census_model(name, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=CALIBRATION)
    from transformers import GenerationConfig

    sliced.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None)  # the full length
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to recomputation warns
        out = sliced.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(out, argmax_chain(sliced, ids, 8))
    assert [d is not None for d in sliced.decoders.values()] == [True]


@pytest.mark.slow  # torch.compile of both graphs: over a minute on 2 cores
def test_compiled_decoding_gives_the_eager_greedy_output():
    _, model = compressed("llama", torch.float32)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    eager = model.generate(ids, max_new_tokens=10, do_sample=False)
    compiled = model.generate(ids, max_new_tokens=10, do_sample=False, compiled=True)
    assert torch.equal(compiled, eager)
    assert any(key[2] for key, decoder in model.decoders.items() if decoder is not None)  # it did compile
    again = model.generate(ids[:, :4], max_new_tokens=10, do_sample=False, compiled=True)  # another prompt length
    assert torch.equal(again, model.generate(ids[:, :4], max_new_tokens=10, do_sample=False))


class _GroupedAttention(torch.nn.Module):
    """Attention over keys and values repeated for the query heads that share them: ``each`` repeats
    every head 3 times in a row (transformers' repeat_kv), otherwise the whole set of heads is tiled."""

    def __init__(self, each: bool):
        super().__init__()
        self.each = each

    def repeat(self, x):
        b, h, s, d = x.shape
        if self.each:
            return x[:, :, None].expand(b, h, 3, s, d).reshape(b, h * 3, s, d)
        return x[:, None].expand(b, 3, h, s, d).reshape(b, 3 * h, s, d)

    def forward(self, q, k, v, mask):
        out = torch.nn.functional.scaled_dot_product_attention(q, self.repeat(k), self.repeat(v), attn_mask=mask)
        return torch.ops.aten._to_copy(out, dtype=torch.float64) * 2  # a copy to the dtype it already has


@pytest.mark.parametrize("each", [True, False])
def test_streamline_reads_shared_kv_heads_once_and_computes_the_same(each):
    from fxslice.decode import streamline
    from fxslice.graph import aten, is_op

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    mask = torch.rand(5, 5, generator=generator) > 0.3
    mask[:, 0] = True
    gm = torch.export.export(_GroupedAttention(each), (q, k, v, mask)).module()
    expected = gm(q, k, v, mask)
    rewritten = streamline(gm)
    attention = [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention)]
    # Tiling the heads pairs query head i with key head i % 2, which enable_gqa does not: left alone.
    assert [n.kwargs.get("enable_gqa", False) for n in attention] == [each]
    assert rewritten == (2 if each else 1)  # the attention (repeat_kv only) and the idle cast
    assert not any(is_op(n, aten._to_copy) for n in gm.graph.nodes)
    assert torch.equal(gm(q, k, v, mask), expected)


def test_the_decoding_graph_reads_each_kv_head_once():
    from fxslice.graph import aten, is_op

    _, sliced = compressed(passes=(fuse_norm,))  # 4 query heads share 2 KV heads
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(8))
    out = sliced.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, argmax_chain(sliced, ids, 4))
    (decoder,) = [d for d in sliced.decoders.values() if d is not None]
    attention = [n for n in decoder.graph.nodes if is_op(n, aten.scaled_dot_product_attention)]
    assert attention and all(n.kwargs.get("enable_gqa") for n in attention)
    assert not any(is_op(n, aten.expand) and is_op(next(iter(n.users)), aten.reshape) for n in decoder.graph.nodes)


def test_a_decoding_graph_captured_for_one_token_takes_a_prompt_a_token_at_a_time(monkeypatch):
    # Recurrent layers branch on a one-token input, so their decoding graph cannot be captured for any
    # number of tokens; forced here on a model that could be.
    import fxslice.decode as decode

    capture = decode.export_graph

    def only_one_token(base, module, args, kwargs, shapes, causal_lm):
        if kwargs["input_ids"].shape[1] > 1:
            raise fxslice.CaptureError("the decoding step branches on the number of tokens")
        return capture(base, module, args, kwargs, shapes, causal_lm)

    monkeypatch.setattr(decode, "export_graph", only_one_token)
    _, sliced = compressed()
    sliced.generation_config.eos_token_id = None  # the full length
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(9))
    out = sliced.generate(ids, max_new_tokens=4, do_sample=False)
    (decoder,) = [d for d in sliced.decoders.values() if d is not None]
    assert decoder.meta[decode.ONE_TOKEN]
    assert torch.equal(out, argmax_chain(sliced, ids, 4))


def test_recurrent_states_are_cache_buffers_and_a_prompt_runs_a_token_at_a_time(tmp_path):
    # A short-convolution layer's state is held in a dict by its cache layer; its padding mask takes the
    # last T positions of the attention mask, which in the decoding graph covers the whole static cache.
    import transformers

    from fxslice.decode import ONE_TOKEN
    from fxslice.graph import tensor_targets

    config = transformers.Lfm2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     layer_types=["conv", "full_attention"], max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.Lfm2ForCausalLM(config).eval().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=CALIBRATION)
        sliced.generation_config.eos_token_id = None  # the full length
        ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(9))
        out = sliced.generate(ids, max_new_tokens=4, do_sample=False)
    (decoder,) = [d for d in sliced.decoders.values() if d is not None]
    assert decoder.meta[ONE_TOKEN] and "cache_0_conv_states_0" in tensor_targets(decoder)
    assert torch.equal(out, argmax_chain(sliced, ids, 4))
    # decode.pt2 promises T tokens per call: refused, nothing written
    with pytest.raises(fxslice.UnsupportedGraphError, match="one token per call"):
        fxslice.export(sliced, tmp_path / "pt2", cache_len=64, progress=False)
    assert not (tmp_path / "pt2").exists()


def test_a_model_whose_capture_is_specialised_to_its_length_calibrates_runs_any_length_and_generates(tmp_path, monkeypatch):
    # Mamba's reference scan is a Python loop over the tokens: torch.export specialises the graph to the
    # example's length. compile captures it at the calibration's; other lengths are captured when run.
    import transformers

    from fxslice.decode import ONE_TOKEN
    from fxslice.plan import plan_of

    config = transformers.MambaConfig(vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2,
                                      expand=2, conv_kernel=4, time_step_rank=4, use_mambapy=False)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).eval()
    calibration = [{"input_ids": torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(i))}
                   for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=calibration)
        assert plan_of(sliced).capture_length == 12
        ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(9))
        full = sliced(ids).logits
        short = sliced(ids[:, :10]).logits  # another length: captured again, the same weights
        assert len(sliced.reshaped) == 1 and any("captured again" in str(w.message) for w in caught)
        assert torch.allclose(short, full[:, :10], atol=1e-5)
        with monkeypatch.context() as patched:  # which graph takes a shape is remembered: no check again
            patched.setattr(sys.modules["fxslice.capture"], "refusal", lambda *a, **k: pytest.fail("checked again"))
            assert sliced.graph_for(ids[:, :10], torch.ones(2, 10, dtype=torch.long)) is sliced.reshaped[0]
            assert sliced.graph_for(ids, torch.ones_like(ids)) is sliced.graph_module
        fxslice.save(sliced, tmp_path / "m")
        assert torch.equal(fxslice.load(tmp_path / "m")(ids).logits, full)
        sliced.generation_config = transformers.GenerationConfig(pad_token_id=0, eos_token_id=None)
        out = sliced.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
    assert not [w for w in caught if "KV-cache" in str(w.message)]
    (decoder,) = [d for d in sliced.decoders.values() if d is not None]
    assert decoder.meta[ONE_TOKEN]
    # Causal: the logits of the whole output at once are those of each step's prefix (the argmax chain).
    assert torch.equal(out[:, 6:], sliced(out).logits[:, 5:-1].argmax(-1))
    # prefill.pt2 promises any length: refused, nothing written
    with pytest.raises(fxslice.UnsupportedGraphError, match="sequence length it was captured at"):
        fxslice.export(sliced, tmp_path / "pt2", cache_len=64, progress=False)
    assert not (tmp_path / "pt2").exists()


@pytest.mark.slow  # among the slowest tests; recurrent_gemma's census row (tests/test_zoo.py) checks the same
@pytest.mark.parametrize("name", ["recurrent_gemma", "xlstm"], ids=["module-attributes", "own-cache-class"])
def test_recurrent_states_held_outside_a_transformers_cache_are_buffers_reset_for_each_prompt(name):
    # RecurrentGemma's blocks hold their convolution and recurrent states as plain attributes
    # (``self.conv1d_state = ...``), None until a cached call, reassigned at every step; xLSTM takes only
    # a cache of its own class (not a transformers Cache), which it makes when called without one.
    import zoo_configs
    from transformers import GenerationConfig

    from fxslice.graph import tensor_targets

    model = zoo_configs.tiny_model(name, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=CALIBRATION)
        sliced.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None)
        ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
        out = sliced.generate(ids, max_new_tokens=4, do_sample=False)
    # (building the decoding graph checked that a second prompt starts from zero states, not the first one's)
    assert not [w for w in caught if "KV-cache" in str(w.message)]
    (decoder,) = [d for d in sliced.decoders.values() if d is not None]
    assert any(target.startswith("cache_held_") for target in tensor_targets(decoder))
    assert torch.equal(out, argmax_chain(sliced, ids, 4))


def test_a_sliding_window_cache_layer_is_replaced_by_its_full_length_counterpart_states_included():
    """A sliding layer keeps its fill level in a Python int, which a captured decoding graph would bake in
    (positions computed from it stop moving); one that also holds linear-attention states keeps them."""
    from transformers.cache_utils import (LinearAttentionAndStaticFullAttentionLayer,
                                          LinearAttentionAndStaticSlidingWindowAttentionLayer, StaticLayer,
                                          StaticSlidingWindowLayer)

    from fxslice.decode import full_length_layer

    both = LinearAttentionAndStaticSlidingWindowAttentionLayer(max_cache_len=16, sliding_window=4, number_of_states=3)
    full = full_length_layer(both, 32)
    assert type(full) is LinearAttentionAndStaticFullAttentionLayer
    assert full.number_of_states == 3 and full.max_cache_len == 32
    assert type(full_length_layer(StaticSlidingWindowLayer(max_cache_len=16, sliding_window=4), 32)) is StaticLayer
    assert full_length_layer(StaticLayer(max_cache_len=16), 32) is None
    assert full_length_layer(full, 32) is None
