import pytest

from vitray.config import Config, ConfigError, apply_overrides, preset, pretrain, validate
from vitray.config.recipes import PRESETS


def test_h14_recipe_is_table3_row():
    c = preset("h14_jft")
    assert c.model.name == "vit_h14" and c.data.image_size == 224
    o = c.optim
    assert (o.optimizer, o.lr, o.betas, o.global_batch, o.warmup_steps) == ("adam", 3e-4, (0.9, 0.999), 4096, 10_000)
    assert (o.schedule, o.weight_decay, o.grad_clip, o.epochs) == ("linear", 0.1, 1.0, 14)
    assert c.model.dropout == 0.0


@pytest.mark.parametrize("model, dataset, lr, epochs, dropout, wd", [
    ("vit_b16", "jft", 8e-4, 7, 0.0, 0.1), ("vit_l16", "jft", 4e-4, 7, 0.0, 0.1),
    ("vit_b16", "i21k", 1e-3, 90, 0.1, 0.03), ("vit_b16", "imagenet", 3e-3, 300, 0.1, 0.3),
])
def test_table3_rows(model, dataset, lr, epochs, dropout, wd):
    c = pretrain(model, dataset)
    assert (c.optim.lr, c.optim.epochs, c.model.dropout, c.optim.weight_decay) == (lr, epochs, dropout, wd)


def test_every_preset_validates_once_given_data():
    for name in PRESETS:
        validate(apply_overrides(preset(name), ["data.train_uri=s3://b/p"]))


def test_overrides_parse_types():
    c = apply_overrides(Config(), ["optim.lr=1e-3", "optim.betas=0.9,0.95", "scaling.use_gpu=false", "seed=7",
                                   "deepspeed.zero_stage=3"])
    assert c.optim.lr == 1e-3 and c.optim.betas == (0.9, 0.95) and c.scaling.use_gpu is False and c.seed == 7
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim.lrr"), ("optimm.lr=1", "optimm.lr"), ("optim.lr=fast", "optim.lr"),
    ("scaling.use_gpu=maybe", "scaling.use_gpu"), ("optim", "optim"),
])
def test_bad_overrides_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize("override, field", [
    ("model.name=vit_q9", "model.name"),
    ("data.image_size=225", "data.image_size"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("optim.global_batch=4000", "optim.global_batch"),
    ("data.train_uri=gs://b/p", "data.train_uri"),
])
def test_validation_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        validate(apply_overrides(preset("h14_jft"), ["data.train_uri=s3://b/p", override]))
    assert str(e.value).startswith(field)
