"""Episode construction and prototype classification on embeddings (numpy only)."""
import numpy as np
import pytest

from protoedge import fewshot


def labelled(n_classes=30, per_class=20):
    return np.repeat(np.arange(n_classes), per_class)


def test_episode_shapes_and_disjointness():
    labels = labelled()
    rng = np.random.default_rng(0)
    for _ in range(50):
        support, query = fewshot.sample_episode(labels, 5, 3, 7, rng)
        assert support.shape == (5, 3) and query.shape == (5, 7)
        assert not set(support.ravel()) & set(query.ravel())  # no image is both support and query
        classes = labels[support[:, 0]]
        assert len(set(classes)) == 5  # ways are distinct classes
        # every row (support and query) comes from its own class
        assert np.all(labels[support] == classes[:, None]) and np.all(labels[query] == classes[:, None])


def test_episode_errors_are_clear():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="20-way episodes need 20 classes"):
        fewshot.sample_episode(labelled(5), 20, 1, 1, rng)
    with pytest.raises(ValueError, match="an episode needs 21"):
        fewshot.sample_episode(labelled(5, 20), 5, 1, 20, rng)


def test_separable_embeddings_score_100_and_noise_scores_chance():
    labels = labelled(20, 20)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 16)) * 10
    separable = centres[labels] + rng.normal(size=(len(labels), 16)) * 0.1
    r = fewshot.evaluate_episodes(separable, labels, 5, 1, 5, episodes=100)
    assert r["acc"] == 100.0 and r["ci95"] == 0.0
    noise = rng.normal(size=(len(labels), 16))
    r = fewshot.evaluate_episodes(noise, labels, 5, 1, 5, episodes=400)
    assert abs(r["acc"] - 20.0) < 4 * r["ci95"] + 1


def test_cosine_ignores_embedding_length():
    labels = labelled(10, 20)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(len(labels), 8)) + np.eye(8)[labels % 8] * 3
    scaled = x * rng.uniform(0.1, 10, size=(len(x), 1))
    a = fewshot.evaluate_episodes(x, labels, 5, 1, 5, episodes=50, distance="cosine")
    b = fewshot.evaluate_episodes(scaled, labels, 5, 1, 5, episodes=50, distance="cosine")
    assert a["acc"] == b["acc"]
    with pytest.raises(ValueError, match="unknown distance"):
        fewshot.evaluate_episodes(x, labels, distance="manhattan", episodes=1)


def test_soft_kmeans_hand_computed_step():
    # one support point per class at 0 and 10 (1-d); one query at 1 that is (with a sharp
    # temperature) fully assigned to class 0: new prototype 0 = (0 + 1) / 2, prototype 1 stays 10
    protos = np.array([[0.0], [10.0]])
    support = protos[:, None, :]
    refined = fewshot.soft_kmeans_refine(protos, support, np.array([[1.0]]), steps=1, temperature=0.01)
    assert refined == pytest.approx(np.array([[0.5], [10.0]]))


def test_refinement_is_reported_separately_and_helps_on_clustered_queries():
    labels = labelled(20, 20)
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(20, 32))
    x = centres[labels] + rng.normal(size=(len(labels), 32)) * 0.9
    plain = fewshot.evaluate_episodes(x, labels, 5, 1, 15, episodes=300)
    refined = fewshot.evaluate_episodes(x, labels, 5, 1, 15, episodes=300, refine_steps=1)
    assert plain["refine_steps"] == 0 and refined["refine_steps"] == 1
    assert refined["acc"] > plain["acc"]
