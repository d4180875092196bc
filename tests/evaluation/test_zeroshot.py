import json
import os
import socket
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmcl.distributed import note_joined, run_command
from mmcl.evaluation.prompts import builtin_prompt_sets, expand_prompts, fill_template, load_builtin, read_list_file
from mmcl.evaluation.zeroshot import build_zeroshot_classifier, evaluate_zeroshot

from eval_helpers import CLASSNAMES, caption_samples, classification_samples, write_shards

DIM = 16


def hash_text_encoder(texts: list[str]) -> torch.Tensor:
    """Deterministic text 'model': a random vector seeded by the text's CRC (same in every process)."""
    return torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts])


def mean_colour_encoder(pixel_values: torch.Tensor) -> torch.Tensor:
    """Deterministic image 'model': mean colour through a fixed projection."""
    projection = torch.randn(3, DIM, generator=torch.Generator().manual_seed(7))
    return F.normalize(pixel_values.mean(dim=(2, 3)) @ projection, dim=-1)


def test_classifier_normalises_each_prompt_then_averages_then_renormalises():
    vectors = {"a x": torch.tensor([3.0, 0.0]), "b x": torch.tensor([0.0, 1.0]), "a y": torch.tensor([0.0, -2.0]), "b y": torch.tensor([0.0, -5.0])}
    classifier = build_zeroshot_classifier(lambda texts: torch.stack([vectors[t] for t in texts]), ["x", "y"], ["a {c}", "b {}"], batch_size=3)
    expected_x = F.normalize(torch.tensor([1.0, 1.0]), dim=0)  # mean of unit vectors (1,0),(0,1)
    assert torch.allclose(classifier, torch.stack([expected_x, torch.tensor([0.0, -1.0])]))


def test_class_specific_prompts_are_accepted():
    texts, class_ids = expand_prompts(["cat", "dog"], {"dog": ["a dog", "a puppy", "woof"], "cat": ["a cat"]})
    assert texts == ["a cat", "a dog", "a puppy", "woof"] and class_ids == [0, 1, 1, 1]
    vectors = {"a cat": [1.0, 0], "a dog": [0, 1.0], "a puppy": [0, 2.0], "woof": [0, 3.0]}
    classifier = build_zeroshot_classifier(lambda ts: torch.tensor([vectors[t] for t in ts]), ["cat", "dog"], {"cat": ["a cat"], "dog": ["a dog", "a puppy", "woof"]})
    metrics = evaluate_zeroshot(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1]), classifier)
    assert metrics == {"acc1": 1.0, "mean_per_class_recall": 1.0}


def test_builtin_prompt_sets():
    assert {"imagenet1k", "cifar10", "cifar100", "digits"} <= set(builtin_prompt_sets())
    classnames, templates = load_builtin("imagenet1k")
    assert len(classnames) == 1000 and len(templates) == 80 and classnames[0] == "tench"
    assert fill_template(templates[0], "cat") == "a bad photo of a cat."
    assert len(load_builtin("cifar100")[0]) == 100 and load_builtin("cifar10")[0][0] == "airplane"


def test_user_files_txt_and_json(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    (tmp_path / "templates.json").write_text(json.dumps({"templates": ["a {c}."]}))
    (tmp_path / "bad.json").write_text("{oops")
    assert read_list_file(tmp_path / "names.txt", "classnames") == ["cat", "dog"]
    assert read_list_file(tmp_path / "templates.json", "templates") == ["a {c}."]
    with pytest.raises(ValueError, match="not valid JSON"):
        read_list_file(tmp_path / "bad.json", "templates")
    with pytest.raises(ValueError, match="no '\\{c\\}' or '\\{\\}' placeholder"):
        expand_prompts(["cat"], ["a photo"])


# ----------------------------------------------------------------------------- 1 process vs 2 gloo ranks


def _evaluate(shards: str, caption_shards: str) -> dict:
    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.loading import eval_transform
    from mmcl.evaluation.retrieval import encode_retrieval_data, retrieval_metrics
    from mmcl.evaluation.zeroshot import zeroshot_classification

    transform = eval_transform(32)
    loader = build_eval_loader(shards, transform, batch_size=4, num_workers=0)
    zeroshot = zeroshot_classification(
        mean_colour_encoder, hash_text_encoder, loader, CLASSNAMES, ["a {c} square.", "a photo of {c}."], text_batch_size=5
    )
    data = encode_retrieval_data(build_eval_loader(caption_shards, transform, 3, 0), mean_colour_encoder, hash_text_encoder)
    retrieval = retrieval_metrics(data["image_features"], data["text_features"], data["text_to_image"], query_chunk=4, item_chunk=5)
    return {"zeroshot": zeroshot, "retrieval": retrieval, "text_to_image": data["text_to_image"].tolist()}


def _rank_main(rank: int, port: int, shards: str, caption_shards: str, out: str) -> None:
    import atexit

    import torch.distributed as dist

    atexit._clear()  # forked: the parent's atexit handlers (its temporary folders' finalizers) are not ours to run
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    note_joined()

    def work() -> None:
        try:
            (Path(f"{out}.{rank}")).write_text(json.dumps(_evaluate(shards, caption_shards)))
        finally:
            dist.destroy_process_group()

    run_command(work)  # os._exit after the result is written: no gloo teardown abort (pytorch#179291)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_same_numbers_as_one_process(tmp_path):
    # 13 labelled samples in shards of 5, 5, 3 (whole shards dealt to ranks, unevenly) and
    # 7 captioned samples in one shard (samples dealt out one by one).
    write_shards(tmp_path / "cls", classification_samples(13), per_shard=5)
    write_shards(tmp_path / "cap", caption_samples(7), per_shard=7)
    shards, caption_shards = str(tmp_path / "cls"), str(tmp_path / "cap" / "00000.tar")
    single = _evaluate(shards, caption_shards)
    # Samples 0, 3, 6 have one caption, the others two (see caption_samples).
    assert single["text_to_image"] == [0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6]

    os.environ["OMP_NUM_THREADS"] = "1"
    # forked, not spawned: the ranks start without importing torch and mmcl again
    torch.multiprocessing.start_processes(_rank_main, args=(_free_port(), shards, caption_shards, str(tmp_path / "out")),
                                          nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        distributed = json.loads((tmp_path / f"out.{rank}").read_text())
        assert distributed["text_to_image"] == single["text_to_image"]
        assert distributed["zeroshot"] == pytest.approx(single["zeroshot"], abs=0)
        assert distributed["retrieval"] == pytest.approx(single["retrieval"], abs=0)


def test_builtin_digits_prompts_match_the_demo_dataset():
    demo = pytest.importorskip("data_tools.demo_dataset")
    assert load_builtin("digits") == (list(demo.CLASSNAMES), list(demo.ZERO_SHOT_TEMPLATES))
