"""Bad input fails before anything changes, with an error that names the node, its module and what to do."""

import warnings

import pytest
import torch
from torch import nn

import fxslice
from fxslice import FuseNorm, PassOrderError, UnsupportedGraphError, fuse_norm, rotate, slice
from strategies import Arch, TinyLM, example_ids


def test_slice_before_rotate_lists_every_violation():
    with pytest.raises(PassOrderError) as error:
        fxslice.compile(TinyLM(Arch()), [slice(0.25), rotate], example_inputs=(example_ids(Arch()),))
    message = str(error.value)
    assert "'slice' (position 0) needs 'rotate'" in message
    assert "'rotate' (position 1) needs 'fuse_norm'" in message


def test_a_pass_listed_twice_is_rejected():
    with pytest.raises(PassOrderError, match="runs twice"):
        fxslice.compile(TinyLM(Arch()), [fuse_norm, fuse_norm], example_inputs=(example_ids(Arch()),))


def test_a_pass_run_directly_checks_what_ran_before():
    gm = fxslice.capture(TinyLM(Arch()), (example_ids(Arch()),))
    with pytest.raises(PassOrderError, match="needs 'fuse_norm'"):
        rotate(gm)


def test_model_without_a_residual_stream():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(UnsupportedGraphError, match="no residual stream"):
        fxslice.compile(model, [fuse_norm], example_inputs=(torch.randn(2, 3, 8),))


class Roll(nn.Module):
    def forward(self, x):
        return x.roll(1, dims=-1)  # permutes features: does not commute with a rotation


class RollingLM(TinyLM):
    def __init__(self, arch):
        super().__init__(arch)
        self.shuffle = Roll()

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = self.blocks[0](x)
        x = self.shuffle(x)
        for block in self.blocks[1:]:
            x = block(x)
        return self.head(self.final_norm(x))


def test_unknown_op_on_the_stream_is_read_and_written_through_linears_and_named_with_its_module():
    model = RollingLM(Arch(depth=2)).double().eval()
    ids = example_ids(Arch())
    with pytest.warns(UserWarning, match=r"through 2 inserted linears.*aten.roll.default in module 'shuffle'.*register_stream_op"):
        compiled = fxslice.compile(model, [fuse_norm, rotate], example_inputs=(ids,))
    assert not fxslice.report(compiled)["skipped"]
    assert torch.allclose(compiled(ids), model(ids), rtol=0, atol=1e-10)


class PostLNBlock(torch.nn.Module):
    """An encoder block as BERT has it: the residual add comes first, the norm after it, and the norm's
    output is what the next block adds to."""

    def __init__(self, width):
        super().__init__()
        self.attn, self.mlp = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)

    def forward(self, x):
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class PostLNModel(torch.nn.Module):
    def __init__(self, width=16, vocab=20):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.Sequential(PostLNBlock(width), PostLNBlock(width))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.head(self.blocks(self.embed(input_ids)))


class TwoStreams(nn.Module):
    """A rotatable stream, and a second one that is post-LN."""

    def __init__(self):
        super().__init__()
        self.good, self.bad = TinyLM(Arch(depth=1)), PostLNModel(vocab=Arch().vocab)

    def forward(self, ids):
        return self.good(ids) + self.bad(ids)


def test_partly_unsupported_graph_is_reported_or_raises_with_strict():
    model = TwoStreams().double().eval()
    ids = example_ids(Arch())
    with pytest.warns(UserWarning, match="left unchanged"):
        compiled = fxslice.compile(model, [fuse_norm, rotate], example_inputs=(ids,))
    report = fxslice.report(compiled)
    assert {s["pass"] for s in report["skipped"]} == {"fuse_norm", "rotate"}
    assert all("in module 'bad.blocks" in s["reason"] for s in report["skipped"])
    assert len(report["states"]) == 3  # the good stream: embedding, after attention, after MLP
    assert torch.allclose(compiled(ids), model(ids), rtol=0, atol=1e-10)
    with pytest.raises(UnsupportedGraphError, match="post-LN"):
        fxslice.compile(model, [FuseNorm(strict=True)], example_inputs=(ids,))


def test_training_mode_dropout_is_not_a_problem_because_capture_uses_eval():
    model = TinyLM(Arch()).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxslice.compile(model, [fuse_norm, rotate], example_inputs=(example_ids(Arch()),))




def test_a_post_layernorm_stream_is_refused_in_words_a_user_understands():
    with pytest.raises(fxslice.UnsupportedGraphError, match="post-norm stream.*post-LN") as caught:
        fxslice.compile(PostLNModel().eval(), [fuse_norm, rotate], example_inputs=(torch.zeros(1, 5, dtype=torch.long),))
    assert "only pre-norm residual streams can be rotated" in str(caught.value)
