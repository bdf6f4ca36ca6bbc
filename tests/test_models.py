import pytest
import torch

from vitray.models.registry import build_model, canonical, get_spec


@pytest.mark.parametrize("name, paper_millions", [("vit_b16", 86), ("vit_l16", 307), ("vit_h14", 632)])
def test_parameter_counts_match_table1(name, paper_millions):
    with torch.device("meta"):  # count without allocating 2.5 GB for H/14
        model = build_model(name, num_classes=1000)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - paper_millions) / paper_millions < 0.01, millions


@pytest.mark.parametrize("alias", ["ViT-H/14", "vit_h14", "vit-h14", "h14", "VIT_H14"])
def test_names_resolve(alias):
    assert canonical(alias) == "vit_h14"


def test_unknown_model_lists_known():
    with pytest.raises(KeyError, match="vit_b16"):
        canonical("vit_q7")


def test_table1_dimensions():
    h = get_spec("ViT-H/14")
    assert (h.width, h.depth, h.mlp_dim, h.heads, h.patch) == (1280, 32, 5120, 16, 14)
    assert get_spec("vit_l16").tokens(224) == 197 and get_spec("vit_h14").tokens(518) == 37 * 37 + 1


def test_shapes_and_pretraining_head():
    model = build_model("vit_tiny_test", num_classes=7, image_size=(16, 24), representation_size=32)
    x = torch.randn(3, 3, 16, 24)
    assert model(x).shape == (3, 7)
    assert model.forward_features(x).shape == (3, 32)
    assert isinstance(model.pre_logits[1], torch.nn.Tanh)
    assert model.pos_embed.shape == (1, 2 * 3 + 1, 32)  # non-square 2×3 grid + class token
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.cls_token) == 0
    assert 0.015 < model.pos_embed.std().item() < 0.025  # N(0, 0.02)


def test_explicit_attention_matches_fused_path():
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", num_classes=5, image_size=32).eval()
    torch.nn.init.normal_(model.head.weight)  # non-zero head so logits depend on the encoder
    x = torch.randn(2, 3, 32, 32)
    logits, attention = model(x, return_attention=True)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert len(attention) == 2 and attention[0].shape == (2, 2, 17, 17)
    assert torch.allclose(attention[0].sum(-1), torch.ones(2, 2, 17))


@pytest.mark.parametrize("name", ["vit_tiny_test", "hybrid_tiny_test"])
def test_class_token_only_last_block_gives_the_same_logits_and_gradients(name):
    """The classifier reads only the class token, so the last block computes only its output; logits and every
    parameter's gradient must equal those of running all tokens through it."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, image_size=32)
    torch.nn.init.normal_(model.head.weight)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    full = model.head(model.encode(x)[0][:, 0])
    short = model(x)
    assert full.shape == short.shape == (3, 5) and torch.allclose(full, short, atol=1e-5)
    grads = []
    for logits in (full, model(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n
    with torch.no_grad():  # and it is less work: the last block's MLP runs on one token per image
        from torch.utils.flop_counter import FlopCounterMode
        counts = []
        for run in (lambda: model.encode(x), lambda: model(x)):
            with FlopCounterMode(display=False) as counter:
                run()
            counts.append(counter.get_total_flops())
    assert counts[1] < counts[0]


def test_patch_must_divide_image():
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        build_model("vit_tiny_test", num_classes=2, image_size=30)


def test_dropout_placement():
    model = build_model("vit_tiny_test", num_classes=2, image_size=16, dropout=0.1)
    drops = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert "pos_drop" in drops and "blocks.0.attn.drop" in drops and "blocks.0.mlp.drop" in drops
    assert not any("qkv" in n for n in drops)


def test_layer_features_are_the_encoder_tokens_at_that_depth():
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", num_classes=10, image_size=32, representation_size=32).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = model.encode(images)
        last_cls, last_mean, embed_mean = (*model.layer_features(images, [2], "cls"), *model.layer_features(images, [2, 0]))
        embedded = model.patch_embed(images).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    # The last block's [class] token, through the final LayerNorm, is what the head reads.
    torch.testing.assert_close(model.norm(last_cls), tokens[:, 0])
    torch.testing.assert_close(embed_mean, embedded.mean(1))  # layer 0: the embedded patches
    assert last_mean.shape == (3, 32) and not torch.allclose(last_mean, last_cls)
    with pytest.raises(ValueError, match="layer 3: this model has layers 0..2"):
        model.layer_features(images, [3])
