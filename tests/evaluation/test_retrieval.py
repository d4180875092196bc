import pytest
import torch

from mmcl.evaluation.retrieval import dense_retrieval_ranks, recall_at_k, retrieval_metrics, retrieval_ranks


def _both_directions(images, texts, text_to_image, **chunks):
    image_ids = torch.arange(images.shape[0])
    return (
        retrieval_ranks(texts, images, text_to_image, image_ids, **chunks),
        retrieval_ranks(images, texts, image_ids, text_to_image, **chunks),
    )


def test_multiple_captions_any_caption_in_top_k_counts():
    # 3 images along the axes; image 0 has captions 0 (points to image 1) and 1 (points to image 0).
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 1, 0]])
    text_to_image = torch.tensor([0, 0, 2, 1])
    text_query_ranks, image_query_ranks = _both_directions(images, texts, text_to_image)
    assert text_query_ranks.tolist() == [1, 0, 0, 0]  # caption 0 finds image 1 first
    # Image 0's best caption is caption 0 (1.0): rank 0. Image 1's only caption (3) ties at
    # 1.0 with caption 0 (of image 0), which has the lower index: rank 1. Image 2: rank 0.
    assert image_query_ranks.tolist() == [0, 1, 0]
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 5))
    assert metrics == {
        "image_retrieval_recall@1": 0.75, "image_retrieval_recall@5": 1.0,
        "text_retrieval_recall@1": pytest.approx(2 / 3), "text_retrieval_recall@5": 1.0,
    }


def test_ties_count_items_with_lower_index_first():
    # Every item scores the same: a query's rank is the index of its (first) correct item.
    images = torch.ones(5, 2)
    texts = torch.ones(5, 2)
    text_to_image = torch.tensor([4, 2, 2, 0, 1])
    text_query_ranks, image_query_ranks = _both_directions(images, texts, text_to_image)
    assert text_query_ranks.tolist() == [4, 2, 2, 0, 1]
    assert image_query_ranks.tolist() == [3, 4, 1, -1, 0]  # image 3 has no caption: not a query
    assert recall_at_k(image_query_ranks, [1, 2]) == {1: 0.25, 2: 0.5}


@pytest.mark.parametrize("chunks", [dict(query_chunk=1, item_chunk=1), dict(query_chunk=7, item_chunk=5), dict(query_chunk=1000, item_chunk=1000)])
def test_chunked_ranks_equal_dense_ranks(chunks):
    generator = torch.Generator().manual_seed(0)
    n_images, dim = 23, 8
    # Dyadic values (multiples of 1/4 in [-1, 1]) make every dot product exact, so the test
    # also pins ties; random captions per image (0..3; some images have none).
    images = torch.randint(-4, 5, (n_images, dim), generator=generator).float() / 4
    text_to_image = torch.randint(0, n_images, (50,), generator=generator).sort().values
    texts = torch.randint(-4, 5, (50, dim), generator=generator).float() / 4
    texts[::3] = images[text_to_image[::3]]  # some exact matches and many duplicate scores
    image_ids = torch.arange(n_images)
    for queries, items, q_ids, i_ids in [(texts, images, text_to_image, image_ids), (images, texts, image_ids, text_to_image)]:
        dense = dense_retrieval_ranks(queries, items, q_ids, i_ids)
        assert torch.equal(retrieval_ranks(queries, items, q_ids, i_ids, **chunks), dense)
    # Real-valued features too (no exact ties expected).
    images_f = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=generator), dim=-1)
    texts_f = torch.nn.functional.normalize(torch.randn(50, dim, generator=generator), dim=-1)
    dense = dense_retrieval_ranks(texts_f, images_f, text_to_image, image_ids)
    assert torch.equal(retrieval_ranks(texts_f, images_f, text_to_image, image_ids, **chunks), dense)


def test_bad_pairing_is_a_clear_error():
    with pytest.raises(ValueError, match="must point into"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))
