"""dipddpm: Deep Image Prior starts for DDPMs on FashionMNIST, at cluster scale."""

__version__ = "0.1.0"
