"""Pretrained networks split into a body (the part that can be frozen) and a trained head.

    network = build("alexnet", "imagenet", num_classes=10)
    network.model          # nn.Sequential(body, head): images -> logits, for both strategies
    network.blocks         # the body's unfreezable blocks, input to output
    network.preprocess     # mean, std and interpolation that the weights expect

AlexNet and VGG16 keep the study's classifier: FC6 and FC7 with their ImageNet values are
part of the head, and only the last Linear(4096, 1000) becomes Linear(4096, num_classes).
Any other model's last Linear layer is replaced and is the whole head.
"""
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stages.pipeline.errors import UserError
from stages.data.inputs import Preprocess

@dataclass
class Network:
    model: nn.Sequential  # model[0] is the body (images -> features), model[1] the head
    blocks: list[nn.Module]
    preprocess: Preprocess

    @property
    def body(self) -> nn.Module:
        return self.model[0]

    @property
    def head(self) -> nn.Module:
        return self.model[1]


def build(name: str, weights: str, num_classes: int) -> Network:
    """`weights`: imagenet (torchvision's weights API or timm's hub), none, or a state_dict file.
    (Whether the body takes data.image_size: check-inputs. A probe of AlexNet's or VGG's fc6 or
    body: probe_layers.reading.)"""
    net, preprocess = _network(name, weights == "imagenet")
    if weights not in ("imagenet", "none"):
        load_state_dict_file(net, Path(weights))
    return _split(net, num_classes, preprocess)


def _network(name: str, pretrained: bool):
    if name.startswith("timm/"):
        return _timm_model(name.removeprefix("timm/"), pretrained)
    return _torchvision_model(name, pretrained)


def _torchvision_model(name: str, pretrained: bool):
    import torchvision
    from torchvision.models import get_model, get_model_weights
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"model {name!r} is not a torchvision classification model; timm models are timm/<name>")
    default = get_model_weights(name).DEFAULT  # IMAGENET1K_V1 for alexnet and vgg16, as in the study
    try:
        net = get_model(name, weights=default if pretrained else None)
    except OSError as error:  # URLError is an OSError
        raise UserError(f"could not download the ImageNet weights of {name} ({error.__class__.__name__}): "
                        f"put {Path(default.url).name} in $TORCH_HOME/hub/checkpoints/ "
                        "or set weights to a local state_dict file") from None
    transforms = default.transforms()
    return net, Preprocess(tuple(transforms.mean), tuple(transforms.std), transforms.interpolation.value)


def _timm_model(name: str, pretrained: bool):
    import timm
    if not timm.list_models(name):
        raise UserError(f"model timm/{name} is not a timm model name")
    try:
        net = timm.create_model(name, pretrained=pretrained)
    except OSError as error:  # what Hugging Face's hub and urllib raise offline; other errors are not downloads
        if not pretrained:
            raise
        raise UserError(f"could not download the weights of timm/{name} ({error.__class__.__name__}): "
                        "set weights to a local state_dict file") from None
    cfg = net.pretrained_cfg
    return net, Preprocess(tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"] or "bilinear")


def load_tensors(path: Path):
    """torch.load with weights_only=True: tensors and plain values only, so a file from a shared
    remote can never run code here. Anything else, or a damaged file, is a one-line UserError."""
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols it may not read: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).partition("WeightsUnpickler error:")[2].strip() or str(error)
        raise UserError(f"{path} is not a file of tensors and plain values, so it is not loaded (it could run "
                        f"code; {_first_line(reason)}): write it with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError) as error:
        raise UserError(f"{path} cannot be read ({error.__class__.__name__}: {_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or ["no details"])[0][:160]


def read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path} cannot be read as safetensors ({_first_line(error)})") from None
    else:
        state = load_tensors(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state_dict (a dict of tensors) but a {type(state).__name__}: "
                        "check params weights")
    return state


def load_state_dict_file(net: nn.Module, path: Path) -> None:
    """Loads a .pth or .safetensors state_dict strictly, except for the classifier being replaced."""
    state = read_state_dict(path)
    classifier = _last_linear_name(net)
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
                        f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); check params model and weights")


def _split(net: nn.Module, num_classes: int, preprocess: Preprocess) -> Network:
    from torchvision.models import VGG, AlexNet
    if isinstance(net, (AlexNet, VGG)):
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
        body = nn.Sequential(net.features, net.avgpool, nn.Flatten(1))
        return Network(nn.Sequential(body, net.classifier), _conv_blocks(net), preprocess)
    classifier = _last_linear_name(net)
    head = nn.Linear(net.get_submodule(classifier).in_features, num_classes)
    net.set_submodule(classifier, nn.Identity())
    return Network(nn.Sequential(net, head), _stages(net), preprocess)


def _last_linear_name(net: nn.Module) -> str:
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UserError(f"{net.__class__.__name__} has no Linear classifier to replace")
    return names[-1]


def _conv_blocks(net: nn.Module) -> list[nn.Module]:
    """AlexNet: one block per conv layer. VGG: one block per stage between max-poolings."""
    from torchvision.models import AlexNet
    blocks, current = [], []
    for layer in net.features:
        if isinstance(net, AlexNet) and isinstance(layer, nn.Conv2d) and current:
            blocks.append(nn.Sequential(*current))
            current = []
        current.append(layer)
        if not isinstance(net, AlexNet) and isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    if current:
        blocks.append(nn.Sequential(*current))
    return blocks


def _stages(net: nn.Module) -> list[nn.Module]:
    """The stages of ResNet-like, EfficientNet-like, ConvNeXt, ViT and timm models; [] if unknown."""
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):  # torchvision and timm ResNets
        return [getattr(net, f"layer{i}") for i in range(1, 5)]
    for path in ("blocks", "stages", "layers", "features", "encoder.layers", "trunk_output"):
        try:
            container = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) > 1:
            return list(container)
    return []
