"""Linear read-outs of frozen features: the paper's few-shot evaluation and a logistic-regression probe.

Few-shot (paper Sec. 4.1 and big_vision's `fewshot` evaluator): take `shots` training images per class, regress their
pre-logit features onto {−1, 1}^K targets in closed form with an L2 penalty, classify the test set by the largest
output; repeat over seeds and report mean ± std. Features are centred and scaled by the training sample's statistics
and get a bias column, as big_vision does.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg


def ridge_fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                      l2_reg: float = 2.0**10) -> np.ndarray:
    """Closed-form ridge regression onto {−1, 1}^K; returns predicted test labels."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    def prep(x: np.ndarray) -> np.ndarray:
        z = (x - mean) / std
        return np.concatenate([z, np.ones((len(z), 1))], axis=1).astype(np.float64)
    a = prep(train_x)
    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0
    # With fewer samples than features (the usual few-shot case) solve in the sample space: W = Aᵀ(AAᵀ + λI)⁻¹Y.
    if len(a) < a.shape[1]:
        w = a.T @ scipy.linalg.solve(a @ a.T + l2_reg * np.eye(len(a)), targets, assume_a="pos")
    else:
        w = scipy.linalg.solve(a.T @ a + l2_reg * np.eye(a.shape[1]), a.T @ targets, assume_a="pos")
    return (prep(test_x) @ w).argmax(1)


def fewshot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
            shots: tuple[int, ...] = (1, 5, 10, 25), seeds: tuple[int, ...] = (0, 1, 2),
            l2_reg: float = 2.0**10) -> dict[int, tuple[float, float]]:
    """{shots: (mean accuracy, std over seeds)} of ridge few-shot classification."""
    classes = np.unique(train_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results = {}
    for k in shots:
        accs = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.choice(np.flatnonzero(train_y == c), size=k, replace=False) for c in classes])
            pred = ridge_fit_predict(train_x[idx], train_y[idx], test_x, num_classes, l2_reg)
            accs.append(float((pred == test_y).mean()))
        results[k] = (float(np.mean(accs)), float(np.std(accs)))
    return results


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c: float = 1.0, max_iter: int = 1000) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))
