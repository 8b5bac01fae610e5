"""Named networks users ask for (torchvision classification names, CIFAR ResNets, a VGG chain)."""

from fleetprune.models.registry import create, input_shape, load_weights, names

__all__ = ["create", "input_shape", "load_weights", "names"]
