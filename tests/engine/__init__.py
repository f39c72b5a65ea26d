"""Tests of jacext.engine: the backward plans, fused calls, memory reuse, recording and hooks."""
