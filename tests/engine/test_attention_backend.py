"""`[train] attention_backend`: backends that cannot run here are one-line errors naming the
fix. (That every attention call of a family's denoiser goes through the switch, math agreeing
with sdpa, is in tests/models/test_family_conformance.py; F-Lite's own dispatch, bit-identical
to torch's SDPA, in tests/models/test_flite_attention.py.)"""

from __future__ import annotations

import pytest

from ditctl.engine.attention import attention_context
from ditctl.errors import ConfigError


@pytest.mark.parametrize("name", ["flash", "sage", "xformers", "flex"])  # flex: no CPU backward
def test_gpu_backends_are_refused_on_the_cpu(name):
    with pytest.raises(ConfigError, match="CUDA GPU"):
        attention_context(name, "cpu")


def test_an_unknown_backend_names_the_choices():
    with pytest.raises(ConfigError, match="fastest") as caught:
        attention_context("fastest", "cpu")
    assert "sdpa" in caught.value.hint
