from pathlib import Path

from jacext.coverage import table


def test_supported_layers_doc_is_generated_from_the_registry():
    doc = Path(__file__).resolve().parent.parent / "docs" / "supported-layers.md"
    assert doc.read_text() == table(), "regenerate with: python -m jacext.coverage > docs/supported-layers.md"


def test_every_registered_class_is_exercised_by_a_rule_test():
    from jacext.rules import LAYERS

    tests = "".join(p.read_text() for p in (Path(__file__).resolve().parent / "rules").glob("test_*.py"))
    missing = [
        cls.__name__ for cls, layer in LAYERS.items() if layer.rule is not None and f"nn.{cls.__name__}" not in tests
    ]
    assert not missing, f"registered without a test: {missing}"
