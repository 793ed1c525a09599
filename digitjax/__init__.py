"""digitjax: functional-style training of digit recognizers with JAX and Flax."""
__version__ = '0.1.0'
