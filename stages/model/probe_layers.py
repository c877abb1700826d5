"""The layer that a probe reads (train_heads.probe_layer): penultimate, the classifier's own input,
is backbones.build's head as it is; AlexNet and VGG, whose head keeps FC6 and FC7, can also be
probed on FC6's output after its ReLU (fc6), or on the body's output (body)."""
from torch import nn

from stages.model import backbones
from stages.pipeline import feature_cache
from stages.pipeline.errors import UserError
from stages.pipeline.params import Params


def probe_head(p: Params, num_classes: int) -> nn.Module:
    """The head that reads the cached features (train_heads.probe_layer's). Where it is one new Linear
    (any model but AlexNet's and VGG's classifier), it is made from the features' width alone: no
    backbone is built, so torchvision and timm are never imported (a second of every cell)."""
    manifest = feature_cache.read_manifest()
    if manifest.get("head_is_linear"):
        return nn.Linear(next(iter(manifest["splits"].values()))[1], num_classes)
    network = backbones.build(p.model, p.model_weights, num_classes)
    return reading(network, p.train_heads.probe_layer, num_classes).head


def reading(network: backbones.Network, layer: str, num_classes: int) -> backbones.Network:
    """The network with a head whose new last Linear reads `layer`: its classifier cut after FC6's
    ReLU (fc6), or nothing of it (body)."""
    if layer == "penultimate":
        return network
    classifier = network.head
    if not isinstance(classifier, nn.Sequential):
        raise UserError(f"params.yaml: train_heads.probe_layer {layer} needs AlexNet's or VGG's FC6 and FC7; "
                        "use penultimate for this model")
    fc6 = next(i for i, m in enumerate(classifier) if isinstance(m, nn.Linear))
    if layer == "body":
        network.model[1] = nn.Linear(classifier[fc6].in_features, num_classes)
    else:
        network.model[1] = nn.Sequential(*classifier[:fc6 + 2], nn.Linear(classifier[fc6].out_features, num_classes))
    return network
