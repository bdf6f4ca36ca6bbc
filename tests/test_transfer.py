"""Transfer pieces: position-embedding interpolation, the fine-tuning head, released .npz checkpoints, few-shot."""
import numpy as np
import pytest
import torch

from vitray.eval.linear import fewshot, linear_probe
from vitray.models.npz import CheckpointError, load_npz, save_npz
from vitray.models.posemb import resize_pos_embed
from vitray.models.registry import build_model


def _posemb(grid, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1 + grid[0] * grid[1], d, generator=g)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_same_grid_is_identity(method):
    p = _posemb((3, 4))
    assert torch.equal(resize_pos_embed(p, (3, 4), (3, 4), method), p)


def test_bilinear_hand_computed_2x2_to_3x3():
    # Patch embeddings 0, 1 / 2, 3 (one channel); the official zoom maps corner to corner.
    p = torch.tensor([[[9.0], [0.0], [1.0], [2.0], [3.0]]])
    out = resize_pos_embed(p, (2, 2), (3, 3)).reshape(-1).tolist()
    assert out[0] == 9.0  # class token untouched
    assert out[1:] == pytest.approx([0, 0.5, 1, 1, 1.5, 2, 2, 2.5, 3])


def test_non_square_grids_keep_class_token_and_corners():
    p = _posemb((3, 4), d=5)
    out = resize_pos_embed(p, (3, 4), (4, 5))  # the seed's example: 3×4 at pretraining, 4×5 at fine-tuning
    assert out.shape == (1, 1 + 20, 5)
    assert torch.equal(out[:, 0], p[:, 0])
    grid_in, grid_out = p[0, 1:].reshape(3, 4, 5), out[0, 1:].reshape(4, 5, 5)
    for (ri, ci), (ro, co) in [((0, 0), (0, 0)), ((0, 3), (0, 4)), ((2, 0), (3, 0)), ((2, 3), (3, 4))]:
        assert torch.allclose(grid_out[ro, co], grid_in[ri, ci], atol=1e-6)
    h14 = resize_pos_embed(_posemb((16, 16), d=2), (16, 16), (37, 37))  # H/14: 224 → 518
    assert h14.shape == (1, 37 * 37 + 1, 2)


def test_finetune_head_starts_at_zero_and_grid_grows():
    model = build_model("vit_tiny_test", num_classes=10, image_size=16, representation_size=32)
    torch.nn.init.normal_(model.head.weight)
    model.adapt_for_finetuning(num_classes=7, image_size=24)
    assert model.grid == (3, 3) and model.pos_embed.shape == (1, 10, 32)
    assert isinstance(model.pre_logits, torch.nn.Identity)
    logits = model(torch.randn(4, 3, 24, 24))
    assert logits.shape == (4, 7) and torch.count_nonzero(logits) == 0
    with pytest.raises(ValueError, match="not divisible"):
        model.adapt_for_finetuning(num_classes=7, image_size=30)


def test_npz_round_trip_and_resize():
    torch.manual_seed(0)
    src = build_model("vit_tiny_test", num_classes=5, image_size=16, representation_size=32)
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.1)
    data = save_npz(src)
    dst = load_npz(build_model("vit_tiny_test", num_classes=5, image_size=16, representation_size=32), data)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(src(x), dst(x), atol=1e-5)
    # Fine-tuning use: new resolution (pos-emb resized) and a fresh 3-class head.
    ft = build_model("vit_tiny_test", num_classes=3, image_size=32)
    load_npz(ft, data, load_head=False)
    assert torch.equal(ft.cls_token, src.cls_token) and ft.pos_embed.shape == (1, 17, 32)
    assert torch.allclose(ft.pos_embed[0, 0], src.pos_embed[0, 0])


def test_npz_errors_name_the_problem():
    data = save_npz(build_model("vit_tiny_test", num_classes=5, image_size=16))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_npz(build_model("vit_tiny_test", num_classes=5, image_size=16), data[: len(data) // 2], "ckpt.npz")
    with pytest.raises(CheckpointError, match="shape mismatch: head/kernel"):
        load_npz(build_model("vit_tiny_test", num_classes=6, image_size=16), data)
    with pytest.raises(CheckpointError, match="missing keys .*pre_logits/kernel"):
        load_npz(build_model("vit_tiny_test", num_classes=5, image_size=16, representation_size=32), data)


def test_fewshot_recovers_separable_problem():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 4
    def sample(n):
        y = rng.integers(0, 4, n)
        return centers[y] + rng.normal(size=(n, 16)), y
    (tx, ty), (vx, vy) = sample(400), sample(200)
    res = fewshot(tx, ty, vx, vy, shots=(1, 5, 10), seeds=(0, 1, 2))
    assert res[10][0] > 0.95 and res[5][0] > 0.9 and set(res) == {1, 5, 10}
    assert all(0 <= std < 0.2 for _, std in res.values())
    # Labels unrelated to features stay near chance.
    assert fewshot(tx, rng.permutation(ty), vx, vy, shots=(10,))[10][0] < 0.5
    assert linear_probe(tx, ty, vx, vy) > 0.95
