"""Tests of what is built on the engine: jacext.jacobian, jacext.ntk, jacext.natural_gradient, the examples."""
