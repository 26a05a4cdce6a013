"""docs/settings.md is generated from the settings dataclasses and cannot drift from them."""

from __future__ import annotations

import dataclasses

from strategies import settings_doc


def test_the_settings_page_is_up_to_date():
    """Regenerate the page and compare: after changing a setting (its default, doc or allowed
    values) run ``python -m strategies.settings_doc``."""
    assert settings_doc.PAGE.read_text() == settings_doc.render()
    assert settings_doc.main(["--check"]) == 0


def test_every_field_of_every_group_has_a_row():
    text = settings_doc.render()
    for cls, _, _ in settings_doc.SECTIONS:
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, (cls.__name__, f.name)
    groups = {cls for classes in settings_doc.GROUPS.values() for cls in classes}
    assert groups == {cls for cls, _, _ in settings_doc.SECTIONS}  # no group left out
