"""Networks: the VNet encoder/decoders, the SKCM and the full SKCDF model."""

from skcdf.nn.model import SKCDFNet
from skcdf.nn.skcm import SKCM
from skcdf.nn.vnet import Decoder, Encoder

__all__ = ["SKCDFNet", "SKCM", "Encoder", "Decoder"]
