import io
import shutil
import json
import tarfile

import pytest
import torch

from mmcl.evaluation.cli import knn_main, linear_probe_main, retrieval_main, zeroshot_main

from eval_helpers import CLASSNAMES, caption_samples, classification_samples, write_shards

COMMON = ["--device", "cpu", "--workers", "0", "--batch-size", "4"]


def _openclip_args(tiny_openclip):
    name, config, weights = tiny_openclip
    return ["--openclip-model", name, "--openclip-config", str(config), "--openclip-weights", str(weights)]


def _read_classification_shards(paths):
    from PIL import Image

    images, labels = [], []
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            images.append(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
            labels.append(int(members[f"{key}.cls"]))
    return images, torch.tensor(labels)


def accuracy(output, target, topk=(1,)):
    """open_clip_train.zero_shot.accuracy (whose float(ndarray) fails under numpy 2), summed hits per k."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() for k in topk]


def test_zeroshot_cli_matches_open_clip_build_zero_shot_classifier(tiny_openclip, tmp_path):
    import open_clip

    shards = write_shards(tmp_path / "shards", classification_samples(18), per_shard=7)
    (tmp_path / "names.txt").write_text("\n".join(CLASSNAMES))
    templates = ["a photo of a {}.", "a {} square.", "something {}"]
    (tmp_path / "templates.json").write_text(json.dumps(templates))
    out = tmp_path / "zs.json"
    code = zeroshot_main([*_openclip_args(tiny_openclip), *COMMON, "--data", str(tmp_path / "shards"),
                          "--classnames", str(tmp_path / "names.txt"), "--templates", str(tmp_path / "templates.json"),
                          "--output", str(out), "--dataset-name", "colours", "--confusion"])
    assert code == 0
    result = json.loads(out.read_text())
    assert {k: result[k] for k in ("dataset", "model", "task", "language")} == {
        "dataset": "colours", "model": "TinyEvalCLIP", "task": "zeroshot_classification", "language": "en"}
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall", "confusion_matrix"} and result["num_samples"] == 18

    # The same evaluation the way open_clip_train/zero_shot.py does it.
    name, _, weights = tiny_openclip
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    model.eval()
    classifier = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(name), CLASSNAMES, templates, num_classes_per_batch=4)
    images, labels = _read_classification_shards(shards)
    with torch.no_grad():
        features = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    logits = 100.0 * features @ classifier
    acc1, acc5 = accuracy(logits, labels, topk=(1, 5))
    # Sample by sample: the same predictions (the confusion matrix pins every argmax).
    confusion = torch.zeros(6, 6, dtype=torch.long).index_put_((labels, logits.argmax(dim=1)), torch.tensor(1), accumulate=True)
    assert result["metrics"]["confusion_matrix"] == confusion.tolist()
    assert result["metrics"]["acc1"] == pytest.approx(acc1 / len(labels), abs=1e-9)
    assert result["metrics"]["acc5"] == pytest.approx(acc5 / len(labels), abs=1e-9)


def test_retrieval_cli_writes_clip_benchmark_keys(tiny_openclip, tmp_path, capsys):
    write_shards(tmp_path / "captions", caption_samples(9), per_shard=4)
    out = tmp_path / "{dataset}_{model}_{task}.json"
    code = retrieval_main([*_openclip_args(tiny_openclip), *COMMON, "--data", str(tmp_path / "captions"), "--output", str(out), "--chunk-size", "3"])
    assert code == 0
    result = json.loads((tmp_path / "captions_TinyEvalCLIP_zeroshot_retrieval.json").read_text())
    assert result["task"] == "zeroshot_retrieval" and result["num_samples"] == 9 and result["num_captions"] == 15
    expected = {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
    assert set(result["metrics"]) == expected and all(0 <= v <= 1 for v in result["metrics"].values())
    assert result["metrics"]["image_retrieval_recall@10"] == 1.0  # caption queries over 9 images: always in the top 10
    assert "image_retrieval_recall@1" in capsys.readouterr().out  # the table


def test_knn_and_linear_probe_cli(tiny_openclip, tmp_path):
    write_shards(tmp_path / "train", classification_samples(24), per_shard=10)
    write_shards(tmp_path / "test", classification_samples(12), per_shard=12)
    data = ["--train-data", str(tmp_path / "train"), "--test-data", str(tmp_path / "test")]
    assert knn_main([*_openclip_args(tiny_openclip), *COMMON, *data, "--k", "3", "--output", str(tmp_path / "knn.json")]) == 0
    assert linear_probe_main([*_openclip_args(tiny_openclip), *COMMON, *data, "--cs", "1", "100", "--output", str(tmp_path / "lp.json")]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    probe = json.loads((tmp_path / "lp.json").read_text())
    assert knn["task"] == "knn" and probe["task"] == "linear_probe"
    # Each colour is one tight cluster even through a random tower: both classify perfectly.
    assert knn["metrics"]["acc1"] == 1.0 and probe["metrics"]["acc1"] == 1.0
    assert knn["num_train"] == 24 and probe["num_test"] == 12


def test_wrong_inputs_give_one_line_errors(tiny_openclip, tmp_path, capsys):
    assert zeroshot_main([*COMMON, "--data", str(tmp_path)]) == 2
    assert "give exactly one model" in capsys.readouterr().err
    assert zeroshot_main([*_openclip_args(tiny_openclip), *COMMON, "--data", str(tmp_path / "nope" / "{0..3}.tar"), "--prompts", "cifar10"]) == 2
    assert "no shards found" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("model: {}\n")
    assert zeroshot_main(["--model", str(tmp_path / "half"), *COMMON, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not an mmcl model directory" in err and len(err.strip().splitlines()) == 1
    write_shards(tmp_path / "unlabelled", caption_samples(2), per_shard=2)
    assert zeroshot_main([*_openclip_args(tiny_openclip), *COMMON, "--data", str(tmp_path / "unlabelled"), "--prompts", "cifar10"]) == 2
    assert "has no class labels" in capsys.readouterr().err


def test_cli_end_to_end_with_an_mmcl_model_dir(tmp_path):
    pytest.importorskip("mmcl.models")
    from transformers import BertTokenizerFast

    from mmcl.config import ModelConfig, RunConfig, TextTowerConfig, TowerConfig
    from mmcl.model_dir import load_mmcl_model_dir, save_model_dir
    from mmcl.models import build_model

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "square", *CLASSNAMES]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    encoder = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = RunConfig(model=ModelConfig(
        image=TowerConfig(config=dict(model_type="vit", image_size=32, patch_size=8, **encoder)),
        text=TextTowerConfig(config=dict(model_type="bert", vocab_size=100, max_position_embeddings=32, **encoder),
                             tokenizer=str(tmp_path / "tok"), context_length=12),
        embed_dim=16,
    ))
    config.data.image_size = 32
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    from mmcl.models import build_tokenizer

    model_dir = save_model_dir(model, config, build_tokenizer(config.model.text), tmp_path / "model")
    shutil.rmtree(tmp_path / "tok")  # the model directory must not depend on the original tokenizer path
    loaded, _, tokenizer = load_mmcl_model_dir(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    write_shards(tmp_path / "cls", classification_samples(8), per_shard=8)
    (tmp_path / "cls" / "classnames.txt").write_text("\n".join(CLASSNAMES))  # found beside the shards
    write_shards(tmp_path / "cap", caption_samples(6), per_shard=6)
    assert zeroshot_main(["--model", str(model_dir), *COMMON, "--data", str(tmp_path / "cls"), "--output", str(tmp_path / "zs.json")]) == 0
    assert retrieval_main(["--model", str(model_dir), *COMMON, "--data", str(tmp_path / "cap"), "--output", str(tmp_path / "rt.json")]) == 0
    zs = json.loads((tmp_path / "zs.json").read_text())
    rt = json.loads((tmp_path / "rt.json").read_text())
    assert zs["task"] == "zeroshot_classification" and set(zs["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert rt["task"] == "zeroshot_retrieval" and len(rt["metrics"]) == 6
    for value in [*zs["metrics"].values(), *rt["metrics"].values()]:
        assert 0.0 <= value <= 1.0


def test_model_dir_from_pretrained_towers_loads_without_them(tmp_path):
    pytest.importorskip("mmcl.models")
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

    from mmcl.config import ModelConfig, RunConfig, TextTowerConfig, TowerConfig
    from mmcl.model_dir import load_mmcl_model_dir, save_model_dir
    from mmcl.models import build_model, build_tokenizer

    encoder = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **encoder)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=50, max_position_embeddings=32, **encoder)).save_pretrained(tmp_path / "bert")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red"]))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    config = RunConfig(model=ModelConfig(
        image=TowerConfig(name_or_path=str(tmp_path / "vit")),
        text=TextTowerConfig(name_or_path=str(tmp_path / "bert"), context_length=8), embed_dim=8))
    model = build_model(config.model).eval()
    original_tokenizer = build_tokenizer(config.model.text)
    model_dir = save_model_dir(model, config, original_tokenizer, tmp_path / "model")
    shutil.rmtree(tmp_path / "vit")
    shutil.rmtree(tmp_path / "bert")
    loaded, loaded_config, tokenizer = load_mmcl_model_dir(model_dir)
    assert loaded_config.model.image.name_or_path is None and loaded_config.model.image.config["model_type"] == "vit"
    assert model.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert tokenizer("a red square")["input_ids"] == original_tokenizer("a red square")["input_ids"]


@pytest.mark.parametrize("template, says", [
    ("{root}/{foo}.json", "unknown field {foo}; the fields are {dataset}, {model}, {pretrained}, {task}, {language}"),
    ("{root}/{dataset.json", "not a valid template"),
    ("{root}/{}.json", "unknown field {}"),
    ("{root}/file.txt/{dataset}.json", "file.txt is not a folder this user can write to"),
    ("{root}", "is a folder; give a file name such as"),
])
def test_a_bad_output_template_is_one_usage_line_before_any_model_is_loaded(tmp_path, capsys, template, says):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit) as failed:  # argparse: usage line, exit status 2; --model does not even exist
        zeroshot_main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path), "--output", template.replace("{root}", str(tmp_path))])
    assert failed.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --output: '" in error
    assert says in error
    assert not list(tmp_path.glob("*.json"))
