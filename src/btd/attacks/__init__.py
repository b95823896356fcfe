"""Medical deepfake attacks: CT-GAN (3-D cGAN in-painting) and diffusion in-painting."""
