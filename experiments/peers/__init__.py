"""Other libraries' versions of the steps ``experiments.bench`` times, to time them side by side.

Optional: each needs its library (``pip install -e '.[peers]'`` for PyTorch); the bench skips a
peer whose library is not importable.
"""
