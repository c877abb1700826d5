"""The layer that a probe reads (train_heads.probe_layer): penultimate, the classifier's own input,
is backbones.build's head as it is; AlexNet and VGG, whose head keeps FC6 and FC7, can also be
probed on FC6's output after its ReLU (fc6), or on the body's output (body)."""
from torch import nn

from stages.model.backbones import Network
from stages.pipeline.errors import UserError


def reading(network: Network, layer: str, num_classes: int) -> Network:
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
