"""Text-to-image GANs: generators and discriminators (DCGAN, ResNet, MLP, projected, instance-conditioned), pools of
generators, and the pipeline (frozen text tower + generator) that a saved GAN directory loads into."""
