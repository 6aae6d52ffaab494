"""The training side: the synthetic corpus, labelled data, training, evaluation and metrics.

Nothing in the service imports this package; ``model`` itself holds what inference needs (the
network, front end, audio, weights format and runtime).
"""
