"""Image classification: a cat-vs-dog and dog-breed classifier on any ImageNet-1k timm model."""
