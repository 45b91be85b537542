"""The benchmark networks: output shapes, published parameter counts, config and shape errors."""
import pytest
import torch

from launch.models import (LARGE_WIDE_MLP_DEPTH, LARGE_WIDE_MLP_WIDTH, ModelConfig,
                           build_model, count_parameters)
from sparse_comm.schema import ConfigError, build

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


@pytest.mark.parametrize("name, shape, params", [
    ("lenet300", MNIST, 266_610),   # 784*300+300 + 300*100+100 + 100*10+10
    ("lenet5", MNIST, 431_080),     # Caffe LeNet-5: 520 + 25,050 + 400,500 + 5,010
    ("resnet20", CIFAR, 269_722),   # He et al. 2016 report 0.27M
])
def test_published_models_have_their_parameter_counts(name, shape, params):
    assert count_parameters(build_model(ModelConfig(name=name), shape, 10)) == params


@pytest.mark.parametrize("name, shape", [
    ("lenet300", MNIST), ("lenet5", MNIST), ("resnet20", CIFAR), ("resnet20", MNIST),
    ("wide_mlp", (3, 8, 8)),
])
def test_models_map_an_image_batch_to_class_logits(name, shape):
    model = build_model(ModelConfig(name=name, width=64, depth=3), shape, num_classes=7)
    assert model(torch.randn(5, *shape)).shape == (5, 7)


def test_wide_mlp_has_width_times_depth_hidden_layers():
    model = build_model(ModelConfig(name="wide_mlp", width=32, depth=3), (2, 4, 4), 5)
    shapes = [tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")]
    assert shapes == [(32, 32), (32, 32), (32, 32), (5, 32)]


def test_large_wide_mlp_setting_has_at_least_25m_parameters():
    cfg = ModelConfig(name="wide_mlp", width=LARGE_WIDE_MLP_WIDTH, depth=LARGE_WIDE_MLP_DEPTH)
    with torch.device("meta"):  # count without allocating 116 MB
        model = build_model(cfg, MNIST, 10)
    assert count_parameters(model) == 28_980_010 >= 25_000_000


def test_resnet20_option_a_shortcut_subsamples_and_zero_pads_channels():
    block = build_model(ModelConfig(name="resnet20"), CIFAR, 10).stage2[0]
    x = torch.randn(2, 16, 32, 32)
    shortcut = block._shortcut(x)
    assert shortcut.shape == (2, 32, 16, 16)
    assert torch.equal(shortcut[:, :16], x[:, :, ::2, ::2])
    assert not shortcut[:, 16:].any()


def test_lenet5_on_cifar_images_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"'model.name': lenet5 .*\(1, 28, 28\).*are \(3, 32, 32\)") as err:
        build_model(ModelConfig(name="lenet5"), CIFAR, 10)
    assert "\n" not in str(err.value)


def test_input_shape_without_channels_is_a_value_error():
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model(ModelConfig(name="lenet300"), (784,), 10)


@pytest.mark.parametrize("key", ["width", "depth"])
def test_config_check_names_the_key_of_a_nonpositive_size(key):
    with pytest.raises(ConfigError, match=f"'model.{key}': must be >= 1, got 0"):
        build(ModelConfig, {"name": "wide_mlp", key: 0}, "model")
