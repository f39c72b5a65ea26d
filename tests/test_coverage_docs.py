from pathlib import Path

from jacext.coverage import table


def test_supported_layers_doc_is_generated_from_the_registry():
    doc = Path(__file__).resolve().parent.parent / "docs" / "supported-layers.md"
    assert doc.read_text() == table(), "regenerate with: python -m jacext.coverage > docs/supported-layers.md"
