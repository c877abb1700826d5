
import pytest
import torch
from torch import nn

from stages import check_inputs
from stages.model import backbones
from stages.training import finetuning, heads, loop
from stages.pipeline.errors import UserError
from stages.data.inputs import Preprocess
from tests.conftest import LITE0_WEIGHTS, needs_shared, write_malicious


def cached_imagenet_weights(name: str, filename: str, torch_home, monkeypatch) -> nn.Module:
    """weights=imagenet goes through torchvision's weights API, which loads a file already in
    $TORCH_HOME/hub/checkpoints under the expected name without downloading anything."""
    import torchvision
    reference = torchvision.models.get_model(name)
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / filename)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return reference


def test_alexnet_is_the_studys_architecture_with_imagenet_weights(tmp_path, monkeypatch):
    reference = cached_imagenet_weights("alexnet", "alexnet-owt-7be5be79.pth", tmp_path, monkeypatch)
    network = backbones.build("alexnet", "imagenet", num_classes=10)
    head = network.head
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    assert (head[1].in_features, head[4].out_features, head[6].out_features) == (9216, 4096, 10)
    assert torch.equal(head[1].weight, reference.classifier[1].weight)  # FC6 keeps its ImageNet values
    assert torch.equal(head[4].weight, reference.classifier[4].weight)  # FC7 too
    assert torch.equal(network.body[0][0].weight, reference.features[0].weight)
    assert network.preprocess == Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    assert network.body(torch.zeros(2, 3, 224, 224)).shape == (2, 9216)
    assert len(network.blocks) == 5 and all(isinstance(b[0], nn.Conv2d) for b in network.blocks)


def test_vgg16_is_the_studys_architecture_with_imagenet_weights(tmp_path, monkeypatch):
    reference = cached_imagenet_weights("vgg16", "vgg16-397923af.pth", tmp_path, monkeypatch)
    network = backbones.build("vgg16", "imagenet", num_classes=10)
    assert torch.equal(network.head[0].weight, reference.classifier[0].weight)  # FC6
    assert torch.equal(network.head[3].weight, reference.classifier[3].weight)  # FC7
    assert [sum(isinstance(m, nn.Conv2d) for m in b) for b in network.blocks] == [2, 2, 3, 3, 3]
    assert network.head[0].in_features == 25088 and network.head[-1].out_features == 10
    assert network.body(torch.zeros(1, 3, 64, 64)).shape == (1, 25088)


def test_unknown_model_and_unfetchable_weights_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a torchvision classification model"):
        backbones.build("alexnot", "none", 10)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torch.hub.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError, match="put alexnet-owt-7be5be79.pth in"):
        backbones.build("alexnet", "imagenet", 10)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_local_state_dict_is_loaded_strictly_but_for_the_classifier(tmp_path, suffix):
    import torchvision
    reference = torchvision.models.resnet18(num_classes=7)  # a classifier of another size
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(reference.state_dict(), path)
    network = backbones.build("resnet18", str(path), num_classes=10)
    assert torch.equal(network.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert network.head.out_features == 10 and len(network.blocks) == 4
    broken = {k: v for k, v in reference.state_dict().items() if not k.startswith("layer4.1.conv2")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="does not fit this model: 1 missing keys"):
        backbones.build("resnet18", str(tmp_path / "broken.pth"), num_classes=10)


def test_set_trainable_unfreezes_the_last_blocks_and_what_follows():
    network = backbones.build("alexnet", "none", num_classes=10)
    head_params = sum(p.numel() for p in network.head.parameters())
    assert finetuning.set_trainable(network, 0) == head_params
    conv4, conv5 = network.blocks[3][0], network.blocks[4][0]
    expected = head_params + sum(p.numel() for m in (conv4, conv5) for p in m.parameters())
    assert finetuning.set_trainable(network, 2) == expected
    assert not network.blocks[2][0].weight.requires_grad and conv4.weight.requires_grad
    assert finetuning.set_trainable(network, "all") == sum(p.numel() for p in network.model.parameters())
    with pytest.raises(UserError, match="has 5 blocks"):
        finetuning.set_trainable(network, 6)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    network = backbones.build("resnet18", "none", num_classes=10)
    finetuning.set_trainable(network, 1)
    network.model.train()
    loop.keep_norms_in_eval(network.model)
    assert not network.body.bn1.training and not network.body.layer3[0].bn1.training
    assert network.body.layer4[0].bn1.training
    before = network.body.bn1.running_mean.clone()
    network.model(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, network.body.bn1.running_mean)


@needs_shared(LITE0_WEIGHTS)
def test_timm_efficientnet_lite0_with_the_shared_imagenet_weights():
    network = backbones.build("timm/tf_efficientnet_lite0", str(LITE0_WEIGHTS), num_classes=10)
    assert network.preprocess == Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert len(network.blocks) == 7 and network.head.in_features == 1280
    saved = torch.load(LITE0_WEIGHTS, weights_only=True)
    assert torch.equal(network.body.conv_stem.weight, saved["conv_stem.weight"])


@pytest.mark.parametrize("model", ["alexnet", "vgg16"])
def test_feature_extraction_trains_only_the_last_linear_as_the_notebook_did(model):
    network = backbones.build(model, "none", num_classes=10)
    assert heads.set_head_trainable(network.head, "last") == 4096 * 10 + 10  # 40,970
    assert not network.head[0 if model == "vgg16" else 1].weight.requires_grad  # FC6 stays frozen
    assert any(isinstance(m, nn.Dropout) for m in network.head)  # and its Dropout trains along
    everything = sum(p.numel() for p in network.head.parameters())
    assert heads.set_head_trainable(network.head, "classifier") == everything


def test_the_size_check_judges_a_batchnorm_model_by_the_size_not_by_its_probe():
    check_inputs.check_image_size("timm/tf_efficientnet_lite0", 32)  # a 1x1 map at the end: it works
    with pytest.raises(UserError, match=r"data.image_size 16 is too small for vgg16_bn: the smallest size that works is 32"):
        check_inputs.check_image_size("vgg16_bn", 16)  # BatchNorm too


def test_an_image_size_too_small_for_the_model_names_the_smallest_that_works():
    with pytest.raises(UserError, match=r"data.image_size 32 is too small for alexnet: the smallest size that works is 63"):
        check_inputs.check_image_size("alexnet", 32)
    check_inputs.check_image_size("alexnet", 63)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01 random bytes, not a checkpoint" * 10, "is not a file of tensors and plain values, so it is not"),
    ("malicious", "is not a file of tensors and plain values, so it is not loaded .it could run code"),
    ("a list", "is not a state_dict"),
])
def test_a_weights_file_that_is_not_a_state_dict_is_one_line_and_never_runs_code(tmp_path, content, message):
    path, marker = tmp_path / "weights.pth", tmp_path / "code-ran"
    if content == "malicious":
        write_malicious(path, marker)
    elif content == "a list":
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as raised:
        backbones.build("alexnet", str(path), num_classes=10)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists()
