"""creditscape: how the temporal credit assignment rule shapes what an RNN learns."""
__version__ = "0.1.0"
