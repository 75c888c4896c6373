"""`tether review`: human review of a trained policy, the tutorial's ``detect_reward_hacking`` and
``check_rm_quality`` as a tool (see docs/review.md).

- :mod:`tether.review.store`: the samples and answers in ``RUN/review.sqlite`` (:func:`rated_samples` reads them);
- :mod:`tether.review.terminal`: the one-key-per-answer rating loop;
- :mod:`tether.review.report`: Pearson r, the retrain verdict and the reward-hacking flags (pure maths);
- :mod:`tether.review.draw`: the run's policy, reward model and held-out prompts, and sampling them;
- :mod:`tether.review.command`: ``add_arguments`` and ``run_review`` for the CLI.
"""

from tether.review.command import add_arguments, run_review
from tether.review.store import ReviewStore, rated_samples

__all__ = ["ReviewStore", "add_arguments", "rated_samples", "run_review"]
