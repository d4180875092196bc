"""`mmcl.redact`: credentials in shard strings become `***`, environment values their `$NAME`."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mmcl.redact import expand_env, redact, redact_tree


@pytest.mark.parametrize("text, expected", [
    ("https://user:tok3n@host.org:8080/d/{00000..00127}.tar?sig=abc&exp=9&flag",
     "https://***@host.org:8080/d/{00000..00127}.tar?sig=***&exp=***&***"),
    ("s3://AKIA123:secretKey@bucket/laion/00001.tar", "s3://***@bucket/laion/00001.tar"),
    ('pipe:curl -s -L -H "Authorization: Bearer abc.def" https://h/d/{00000..00003}.tar',
     'pipe:curl -s -L -H "Authorization: ***" https://h/d/{00000..00003}.tar'),
    ("pipe:curl -H 'X-Api-Key:k1' --header=Cookie:sess=1 https://h/d/0.tar",
     "pipe:curl -H 'X-Api-Key:***' --header=Cookie:*** https://h/d/0.tar"),
    ("pipe:curl -u me:pw https://h/a.tar", "pipe:curl -u *** https://h/a.tar"),
    ("pipe:curl --oauth2-bearer abc --user=me:pw https://h/a.tar", "pipe:curl --oauth2-bearer *** --user=*** https://h/a.tar"),
    ("pipe:AWS_SECRET_ACCESS_KEY=abc aws s3 cp s3://b/a.tar -", "pipe:AWS_SECRET_ACCESS_KEY=*** aws s3 cp s3://b/a.tar -"),
    ("no sizes.json entry for https://x:y@h/d/00000.tar (HTTP 404)", "no sizes.json entry for https://***@h/d/00000.tar (HTTP 404)"),
    ("got header Bearer eyJhbGciOi", "got header Bearer ***"),
])
def test_redact_masks_credentials_and_keeps_host_and_path_shape(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: a redacted string passes through unchanged


@pytest.mark.parametrize("text", [
    "data/{00000..00127}.tar::/mnt/laion/{00000..00009}.tar",
    "http://127.0.0.1:8000/i2d/{00000..00003}.tar",
    "pipe:python -u unpack.py data/00001.tar",  # -u without user:password is not curl's --user
    'pipe:curl -s -H "Authorization: Bearer $TOKEN" "https://$USER:${PASS}@h/a.tar?t=$SIG"',  # names, not values
    "SIZES=3 make shards; no shard files match 'x.tar'",
    "the Hub rejected the token as invalid (401 Unauthorized)",
])
def test_redact_leaves_text_without_credentials_alone(text):
    assert redact(text) == text


def test_values_from_the_environment_go_back_to_their_names(monkeypatch):
    monkeypatch.setenv("SHARD_ROOT", "https://cdn.example/8f2a9c41secretpath")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("SHORT", "ab")
    expanded = expand_env("$SHARD_ROOT/{00000..00003}.tar")
    assert expanded == "https://cdn.example/8f2a9c41secretpath/{00000..00003}.tar"  # mmcl reads the shards there
    assert redact(f"cannot read {expanded}") == "cannot read $SHARD_ROOT/{00000..00003}.tar"
    assert redact("pushing with hf_abcdefghijklmnop") == "pushing with $HF_TOKEN"  # secret-named variable
    assert redact("ab cd") == "ab cd"  # short values are not looked for


def test_redact_tree_redacts_every_string_of_a_config():
    config = {"data": {"train_shards": "https://u:p4ss@h/d/{0..1}.tar?token=t0k", "image_size": 16,
                       "train_weights": None},
              "eval": {"retrieval_shards": 'pipe:curl -H "Authorization: Bearer s3cr3t" https://h/v/0.tar'},
              "list": ["https://a:b@h/x.tar", 3]}
    assert redact_tree(config) == {
        "data": {"train_shards": "https://***@h/d/{0..1}.tar?token=***", "image_size": 16, "train_weights": None},
        "eval": {"retrieval_shards": 'pipe:curl -H "Authorization: ***" https://h/v/0.tar'},
        "list": ["https://***@h/x.tar", 3]}


def test_redact_imports_no_torch():
    code = "import sys, mmcl.redact; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_redact_stops_a_url_where_markdown_or_a_sentence_ends_it():
    assert (redact("Data: `https://u:p@h/d/{0..9}.tar?token=t&exp=1` (10 shards); (http://h/a.tar?k=v)")
            == "Data: `https://***@h/d/{0..9}.tar?token=***&exp=***` (10 shards); (http://h/a.tar?k=***)")
