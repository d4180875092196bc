"""eval.templates / eval.classnames: an inline YAML list or a file path, read alike."""
import pytest

from mmcl.config import ConfigError, from_dict
from mmcl.evaluation.settings import entries

RUN = {"model": {"image": {"config": {"model_type": "vit", "hidden_size": 32}},
                 "text": {"config": {"model_type": "bert"}, "tokenizer": "bert-base-uncased"}, "embed_dim": 64}}


def test_inline_lists_and_files_give_the_same_entries(tmp_path):
    (tmp_path / "templates.json").write_text('["a photo of a {}.", "a drawing of a {}."]')
    (tmp_path / "classnames.txt").write_text("zero\none\n")
    inline = from_dict({**RUN, "eval": {"templates": ["a photo of a {}.", "a drawing of a {}."], "classnames": ["zero", "one"]}})
    files = from_dict({**RUN, "eval": {"templates": str(tmp_path / "templates.json"),
                                       "classnames": str(tmp_path / "classnames.txt")}})
    for what in ("templates", "classnames"):
        assert entries(getattr(inline.eval, what), what) == entries(getattr(files.eval, what), what)
    assert entries(None, "templates") is None


@pytest.mark.parametrize("value, message", [
    ([], "'eval.templates' is an empty list"),
    ("missing.json", "'eval.templates' points to 'missing.json', which does not exist."),
    ([1, 2], "'eval.templates' must be a string or a list or null"),
])
def test_bad_prompt_values_are_one_sentence(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        from_dict({**RUN, "eval": {"templates": value}})
