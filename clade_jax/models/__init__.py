"""Networks of the CLADE and SPADE papers: generator, multiscale discriminator, VAE encoder."""

from clade_jax.models.discriminator import MultiscaleDiscriminator, NLayerDiscriminator
from clade_jax.models.encoder import ConvEncoder, reparameterize
from clade_jax.models.generator import Generator, ResnetBlock

__all__ = [
    "ConvEncoder",
    "Generator",
    "MultiscaleDiscriminator",
    "NLayerDiscriminator",
    "ResnetBlock",
    "reparameterize",
]
